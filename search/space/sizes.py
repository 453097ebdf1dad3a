"""Storage sizes as people write them: ``500GB``, ``2TB``, ``1.5TiB`` (decimal units for
kB/MB/GB/TB/PB, binary ones for KiB/MiB/GiB/TiB/PiB), and back."""

from __future__ import annotations

import re

from difftune.trainables.errors import UserError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "p": 10**15, "pb": 10**15,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(value: str | int | float, *, what: str = "size") -> int:
    """Bytes of ``500GB``, ``2TB``, ``1.5TiB``, ``750 MiB`` or a plain number of bytes.

    :param what: the setting's name, for the error message.
    """
    if isinstance(value, bool):
        raise UserError(f"{what}={value!r} is not a size; write e.g. 500GB, 2TB or 1.5TiB")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        m = _SIZE.match(str(value))
        if not m or m[2].lower() not in _UNITS:
            raise UserError(f"{what}={value!r} is not a size; write e.g. 500GB, 2TB or 1.5TiB "
                            "(kB/MB/GB/TB/PB are powers of 1000, KiB/MiB/GiB/TiB/PiB of 1024)")
        number, unit = float(m[1]), m[2].lower()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise UserError(f"{what}={value!r} must be a positive size")
    return size


def format_size(n: float) -> str:
    """``10515818736`` -> ``10.5 GB`` (decimal units, three significant digits)."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"
