"""The command line's parser: one-line usage errors, help that states each default once, and
argument types that check a number's allowed range before anything starts.

Every mistake on the command line ends like every other user error: one line
``difftune COMMAND: error: ...`` naming the flag and what is allowed, exit code 2.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["NO_PASSWORD_FLAGS", "HelpFormatter", "Parser", "check_env_number", "fraction",
           "integer", "int_list", "no_password", "number"]

#: URI flags whose value must hold no password (every subcommand's: :class:`Parser` gives
#: them the type :func:`no_password`)
NO_PASSWORD_FLAGS = ("--tracking-uri", "--optuna-storage")


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help when X says something: not for required
    options, not for defaults of None, False or [], and not when the help already names the
    default in its own words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or action.required or default is argparse.SUPPRESS
                or default is None or default is False or default == []
                or "default" in text.lower()):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with :class:`HelpFormatter` and one-line errors."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def add_argument(self, *args, **kwargs):  # noqa: D102 - argparse's
        flag = next((a for a in args if a in NO_PASSWORD_FLAGS), None)
        if flag is not None and "type" not in kwargs:
            kwargs["type"] = no_password(flag)
        return super().add_argument(*args, **kwargs)


def no_password(flag: str) -> Callable[[str], str]:
    """An argparse type: a URI without a password (a command line is readable by every user
    of the machine, and Ray records the driver's); the error names where it belongs."""
    def parse(text: str) -> str:
        from difftune.search.records.uris import refuse_password_on_command_line

        try:
            refuse_password_on_command_line(flag, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    parse.__name__ = "uri"
    return parse


def _num(text: str, kind: type) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``low..high`` (no upper end when None)."""
    allowed = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"

    def parse(text: str) -> int:
        value = _num(text, int)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range; allowed: {allowed}")
        return value

    parse.__name__ = "integer"
    return parse


def number(low: float, *, open_low: bool = True) -> Callable[[str], float]:
    """An argparse type: a finite number > ``low`` (>= with ``open_low=False``)."""
    allowed = f"a number {'>' if open_low else '>='} {low:g}"

    def parse(text: str) -> float:
        value = _num(text, float)
        if value < low or (open_low and value == low):
            raise argparse.ArgumentTypeError(f"{value:g} is out of range; allowed: {allowed}")
        return value

    parse.__name__ = "number"
    return parse


def fraction(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    value = _num(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value:g} is out of range; allowed: a number in (0, 1]")
    return value


def rungs(text: str) -> list[float]:
    """An argparse type: rungs over images, increasing comma-separated fractions ending at 1
    (``0.02,0.1,0.5,1``), or ``off`` (``[]``: every trial reads every image)."""
    if text.strip().lower() in ("off", "none"):
        return []
    from difftune.search.space.checks import is_rungs

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not is_rungs(values):
        raise argparse.ArgumentTypeError(
            f"{text!r} is invalid; allowed: increasing fractions in (0, 1] ending at 1, e.g. "
            "0.02,0.1,0.5,1, or off")
    return values


def int_list(text: str) -> list[int]:
    """An argparse type: comma-separated integers (at least one)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def check_env_number(name: str, *, low: float = 0.0, env: dict[str, str] | None = None) -> None:
    """A number setting read from the environment later on (e.g. at the end of a search) is
    checked now: one line naming the variable when it is not a number >= ``low``."""
    import os

    from difftune.trainables.errors import UserError

    raw = (os.environ if env is None else env).get(name)
    if raw is None:
        return
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < low:
        raise UserError(f"${name}={raw!r} is invalid; allowed: a number >= {low:g}")
