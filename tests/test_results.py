"""Every figure the README and docs/ quote from a benchmark names the row of
``benchmarks/RESULTS.md`` it comes from, and is in that row.

The convention (docs/benchmarks.md states it): a quote ends with a link whose text is the
row's script name, date and time and whose target is ``benchmarks/RESULTS.md``, e.g.
``[optuna_vs_random 2026-12-07 18:21](../benchmarks/RESULTS.md)``. The figures of that quote
are the numbers written between the previous such link (or the start of the paragraph, list
item or table cell) and this one, outside code spans; each must equal, to the digits
written, a number of that row. A paragraph or cell that quotes a figure (a number with ``%``
or ``x``, or with decimals) and names a benchmark must carry such a link; so must every
result cell of docs/benchmarks.md's table that holds a number.

docs/paper-scale.md and docs/layout.md are left out for now (their tables are being
rewritten apart). Reads files only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SKIPPED = frozenset({"paper-scale.md", "layout.md"})
PAGES = [ROOT / "README.md", *(p for p in sorted((ROOT / "docs").glob("*.md"))
                               if p.name not in SKIPPED)]
MARKER = re.compile(r"\[([a-z][a-z0-9_]*) (\d{4}-\d\d-\d\d \d\d:\d\d)\]\(([^)\s]*)\)")
ROW = re.compile(r"^\| (\d{4}-\d\d-\d\d \d\d:\d\d) \| [^|]* \| `([a-z][a-z0-9_]*) (.*)` \|$")
#: a number as prose writes it: not part of a word (``paper256``, ``10k``), thousands with
#: commas, an optional ``x`` suffix (``67x``)
QUOTED = re.compile(r"(?<![\w.\-/])-?(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(?=x\b|(?![\w]))")
IN_ROW = re.compile(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?")
#: a figure as a benchmark reports it: a percentage, a ratio, a decimal with a unit
FIGURE = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:x\b| ?%)|(?<![\w.])\d+\.\d+ (?:points|s|GB)\b")
DECIMAL = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.])")
BENCHMARK = re.compile(r"benchmarks[/.]\w+|\]\((?:\.\./)?(?:docs/)?benchmarks\.md\)")


@dataclass(frozen=True)
class Unit:
    """A paragraph, list item or table cell of a page."""

    page: str
    line: int
    text: str
    cell: bool = False
    result_cell: bool = False


def rows() -> dict[tuple[str, str], list[str]]:
    """(name, date) -> the summary lines of RESULTS.md with that name and date."""
    out: dict[tuple[str, str], list[str]] = {}
    for line in RESULTS.read_text().splitlines():
        m = ROW.match(line)
        if m:
            out.setdefault((m.group(2), m.group(1)), []).append(m.group(3))
    return out


def units(path: Path) -> list[Unit]:
    """The paragraphs, list items and table cells of ``path``, code blocks left out."""
    out: list[Unit] = []
    lines: list[str] = []
    start, fenced = 0, False
    rel = path.relative_to(ROOT).as_posix()

    def flush() -> None:
        if lines:
            out.append(Unit(rel, start, " ".join(lines)))
            lines.clear()

    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if line.startswith("```"):
            flush()
            fenced = not fenced
            continue
        if fenced:
            continue
        if line.startswith("|"):
            flush()
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            for j, cell in enumerate(cells):
                out.append(Unit(rel, i, cell, cell=True, result_cell=j == 2 and rel == "docs/benchmarks.md"
                                and not set(cell) <= set("- ")))
            continue
        if not line.strip() or re.match(r"\s*(?:[-*]|\d+\.) ", line) or line.startswith("#"):
            flush()
        if line.strip():
            if not lines:
                start = i
            lines.append(line.strip())
    flush()
    return out


def figures(span: str) -> list[tuple[str, float, int]]:
    """``(as written, value, decimals)`` of the numbers in ``span`` outside code spans and
    link targets."""
    text = re.sub(r"`[^`]*`", " ", span)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return [(m.group(0), float(m.group(1).replace(",", "") + "." + (m.group(2) or "0")),
             len(m.group(2) or "")) for m in QUOTED.finditer(text)]


def holds(line: str, value: float, decimals: int) -> bool:
    """Whether ``line`` (a row's summary) has a number that rounds to ``value`` at
    ``decimals`` decimals."""
    tol = 0.5 * 10 ** -decimals + 1e-9 * max(1.0, abs(value))
    return any(abs(float(v) - abs(value)) <= tol for v in IN_ROW.findall(line))


def quotes() -> list[tuple[Unit, str, str, str]]:
    """``(unit, name, date, span)`` of every marked quote."""
    out = []
    for page in PAGES:
        for unit in units(page):
            last = 0
            for m in MARKER.finditer(unit.text):
                if m.group(3).endswith("benchmarks/RESULTS.md"):
                    out.append((unit, m.group(1), m.group(2), unit.text[last:m.start()]))
                    last = m.end()
    return out


def unmarked(page_units: list[Unit]) -> list[str]:
    """Units that quote a figure of a benchmark without naming its row."""
    bad = []
    for unit in page_units:
        marked = any(m.group(3).endswith("benchmarks/RESULTS.md")
                     for m in MARKER.finditer(unit.text))
        code_free = re.sub(r"`[^`]*`", " ", unit.text)
        if marked:
            continue
        if unit.page == "docs/benchmarks.md":  # the figures page: its result cells, prose
            quoting = QUOTED.search(code_free) if unit.cell else \
                FIGURE.search(code_free) or DECIMAL.search(code_free)
            quoting = quoting and (unit.result_cell or not unit.cell)
        else:
            quoting = FIGURE.search(code_free) and BENCHMARK.search(unit.text)
        if quoting:
            bad.append(f"{unit.page}:{unit.line}: {unit.text[:80]}")
    return bad


def test_the_convention_is_stated_at_the_top_of_the_figures_page():
    head = (ROOT / "docs" / "benchmarks.md").read_text()[:2500]
    assert "benchmarks/RESULTS.md" in head and MARKER.search(head)


def test_every_quote_names_one_row_that_exists():
    table = rows()
    found = quotes()
    assert len(found) >= 10  # the figures page alone quotes more rows than that
    for unit, name, date, _ in found:
        assert len(table.get((name, date), [])) == 1, \
            f"{unit.page}:{unit.line}: no single row {name} {date} in benchmarks/RESULTS.md"


def test_every_quoted_figure_is_in_its_row():
    table = rows()
    for unit, name, date, span in quotes():
        line = table.get((name, date), [""])[0]
        missing = [w for w, v, d in figures(span) if not holds(line, v, d)]
        assert not missing, (f"{unit.page}:{unit.line}: {missing} not in the row {name} "
                             f"{date}: {span.strip()[:120]}")


def test_every_quoted_figure_names_its_row():
    bad = [b for page in PAGES for b in unmarked(units(page))]
    assert not bad, "figures quoted without their row:\n" + "\n".join(bad)


@pytest.mark.parametrize(("span", "row", "ok"), [
    ("67x fewer passes (8,985)", "cache_vs_recompute image_pass_ratio=67.2 limit=8985", True),
    ("1.49 [1.37, 1.61]", "x a=1.486 a_lo=1.369 a_hi=1.608", True),
    ("1.49 [1.37, 1.62]", "x a=1.486 a_lo=1.369 a_hi=1.608", False),
    ("0.77x", "x a=1.486 b=1.919", False),  # a ratio worked out by hand is not in the row
    ("`--seeds 1000` on paper256, 10k images", "x a=1", True),  # code, names: not figures
])
def test_the_check_catches_a_figure_its_row_lacks(span, row, ok):
    assert all(holds(row, v, d) for _, v, d in figures(span)) is ok


def test_a_figure_without_its_row_is_caught():
    page = [Unit("docs/cache.md", 1, "`benchmarks/cache_fidelity.py` scores 94.9% here"),
            Unit("docs/benchmarks.md", 2, "2.7x less wall time", cell=True, result_cell=True),
            Unit("docs/benchmarks.md", 2, "one trial, 28 epochs, 0.2 of the labels", cell=True),
            Unit("docs/cache.md", 3, "a batch of 64 images (no benchmark named)")]
    assert len(unmarked(page)) == 2
