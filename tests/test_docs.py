"""The README is the front door and docs/ the manual: the two set-up commands, one screenshot
that exists, a "Read on" line per docs page, relative links that resolve, and module paths
in prose that exist (docs/layout.md names every module of search/ and trainables/).

Reads files only: no network, no model, no Ray.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
PROSE = [README, ROOT / "cluster" / "README.md", *PAGES]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_readme_keeps_the_two_commands_and_stays_short():
    text = README.read_text()
    assert ("pip install torch==2.14.1 torchvision==0.29.1 && pip install . && difftune search"
            in text)
    assert ("pip install torch==2.14.1 torchvision==0.29.1 && pip install -e \".[test]\" && "
            "python -m pytest -q" in text)
    assert len(text.splitlines()) <= 250


def test_readme_shows_one_screenshot_that_exists():
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README.read_text())
    assert len(images) == 1
    assert images[0].startswith("benchmarks/screenshots/") and (ROOT / images[0]).is_file()


def test_every_docs_page_is_linked_from_the_readme():
    linked = set(LINK.findall(README.read_text()))
    assert PAGES
    for page in PAGES:
        assert f"docs/{page.name}" in linked, page.name


def test_relative_links_resolve():
    for doc in PROSE:
        for target in LINK.findall(doc.read_text()):
            if "://" in target or target.startswith(("#", "mailto:")):
                continue
            path = target.split("#", 1)[0]
            assert (doc.parent / path).exists(), f"{doc.relative_to(ROOT)}: {target}"


def test_module_paths_in_prose_exist():
    pattern = re.compile(r"\b((?:search|trainables|benchmarks|tests|cluster)/[\w/]+\.py)\b")
    for doc in PROSE:
        for path in pattern.findall(doc.read_text()):
            assert (ROOT / path).is_file(), f"{doc.relative_to(ROOT)}: {path}"


def test_layout_names_every_module():
    """docs/layout.md's tree: a line per module of search/ and trainables/ (a package's
    one-line ``__init__.py`` aside), under its folder, and no line for a module that is gone."""
    tree = (DOCS / "layout.md").read_text().split("```", 2)[1]
    listed: set[str] = set()
    stack: list[tuple[int, str]] = []
    for line in tree.splitlines():
        m = re.match(r"( *)(\S+)", line)
        if not m or line.startswith(" " * 29):  # blank, or a continued description
            continue
        indent, name = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = "".join(p for _, p in stack) + name
        if name.endswith("/"):
            stack.append((indent, name))
        else:
            listed.add(path)
    for pkg in ("search", "trainables"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            rel = f.relative_to(ROOT).as_posix()
            if f.name == "__init__.py" and len(f.read_text().strip().splitlines()) <= 1:
                continue
            assert rel in listed, f"docs/layout.md does not list {rel}"
    for path in sorted(listed):
        assert (ROOT / path).is_file(), f"docs/layout.md lists {path}, which is not there"


def test_benchmarks_are_shown_as_modules():
    """Benchmarks run as ``python -m benchmarks.NAME`` from the repository root."""
    for doc in PROSE:
        assert not re.search(r"python3? benchmarks/", doc.read_text()), doc.relative_to(ROOT)
