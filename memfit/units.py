"""Byte sizes: parsing what users write (``"6GiB"``, ``"512MB"``) and printing what memfit reports.

Its own module because everything prints sizes (the planner, the passes, the reports, the CLI) while
only the options parse them: with the two in ``config``, ``config`` and ``planner.budget`` imported
each other.
"""

from __future__ import annotations

import re
from typing import Any

#: Binary and decimal units accepted by :func:`parse_bytes`.
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}

_BYTES_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: Any, *, what: str = "budget") -> int | None:
    """Turn ``6GiB``, ``"512 MB"``, ``1.5e9`` or ``None`` into a byte count (or ``None``).

    Binary units (KiB, MiB, GiB, TiB) are powers of 1024, decimal ones (KB, MB, GB, TB) powers of
    1000, as `torch.cuda.memory_summary` and `nvidia-smi` disagree on this and users copy from both.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{what}={value!r} is not a size; give bytes as an int or a string such as '6GiB'")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{what}={value!r} must be a positive number of bytes (or None for no limit)")
        return _whole_bytes(value, value, what)
    if isinstance(value, float):
        if not value > 0 or value != value or value == float("inf"):
            raise ValueError(f"{what}={value!r} must be a positive, finite number of bytes (or None for no limit)")
        return _whole_bytes(value, value, what)
    if isinstance(value, str):
        m = _BYTES_RE.match(value)
        unit = m.group(2).lower() if m else None
        if not m or unit not in _UNITS:
            accepted = ", ".join(u for u in ("B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"))
            raise ValueError(
                f"{what}={value!r} is not a size; write a number and a unit ({accepted}), e.g. '6GiB' or '512MB'"
            )
        n = float(m.group(1)) * _UNITS[unit]
        if n <= 0:
            raise ValueError(f"{what}={value!r} must be positive (or None for no limit)")
        return _whole_bytes(n, value, what)
    raise ValueError(f"{what}={value!r} has type {type(value).__name__}; give an int of bytes or a string such as '6GiB'")


#: The largest size accepted: far above any device (1 EiB), far below where a float stops counting bytes.
MAX_BYTES = 2**60


def _whole_bytes(n: float, value: Any, what: str) -> int:
    """``n`` bytes as an int: at least 1 (a budget of half a byte would print as "0 B" and refuse every
    plan) and at most ``MAX_BYTES`` (a 400-digit string overflowed to ``inf``, then ``OverflowError``)."""
    if not n < MAX_BYTES:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ValueError(f"{what}={shown} is too large: at most {MAX_BYTES} bytes (1 EiB)")
    if n < 1:
        raise ValueError(f"{what}={value!r} is less than one byte; give a whole number of bytes or a size such as '6GiB'")
    return int(n)


def format_bytes(n: float | int | None) -> str:
    """Human-readable binary size: ``format_bytes(3 * 2**30) == '3.00 GiB'``."""
    if n is None:
        return "no limit"
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


__all__ = ["format_bytes", "parse_bytes"]
