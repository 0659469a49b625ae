"""Options for the memfit backend, and byte-size parsing.

Options are a frozen dataclass so that a set of options is hashable (it becomes part of a compile
cache key) and cannot drift between the graphs of one model. Every constructor path —
``torch.compile(..., backend="memfit", options={...})``, ``memfit.backend(**kwargs)`` and the CLI —
goes through :func:`make_options`, so a bad value gets the same message everywhere: it names the bad
value and lists what is accepted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any, Iterable

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

INNER_COMPILERS = ("inductor", "eager")


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
        return value
    if isinstance(value, float):
        if not value > 0 or value != value or value == float("inf"):
            raise ValueError(f"{what}={value!r} must be a positive, finite number of bytes (or None for no limit)")
        return int(value)
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
        return int(n)
    raise ValueError(f"{what}={value!r} has type {type(value).__name__}; give an int of bytes or a string such as '6GiB'")


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


@dataclass(frozen=True, kw_only=True)
class Options:
    """What the user asked of the backend. Build with :func:`make_options`, which validates."""

    budget: int | None = None
    """Peak bytes the training step may use above what is resident before it; ``None``: no limit."""

    passes: tuple[str, ...] | str = "auto"
    """Pass names to run (see ``memfit.passes.PASSES``), or ``"auto"``: let the planner choose."""

    device: str | None = None
    """Device profile for the cost model (``"h100"``, ``"a100"``, ``"cpu"``); ``None``: the device of
    the graph's inputs."""

    inner: str = "inductor"
    """Compiler that runs the rewritten graphs: ``"inductor"`` or ``"eager"`` (for debugging)."""

    report: str | None = None
    """Path of a JSON report of every graph compiled and every decision; ``None``: no file."""

    fewbit_bits: int = 2
    """Bits per element of the few-bit activation codes (1..4), when ``"fewbit"`` is among the
    passes. The few-bit pass is approximate, so it runs only when named; ``"auto"`` never picks it."""

    fewbit_calibration: Any = None
    """A ``memfit.calibrate_fewbit(...)`` result: weight the few-bit tables by the measured inputs of
    each activation kind instead of a standard normal."""

    device_memory: int | None = None
    """The whole device's memory (``"80GiB"``), instead of ``budget``: the step's budget is what is
    left after the resident bytes (parameters, optimizer state from ``optimizer``, or on a GPU the
    allocator's own figure); the report states the subtraction."""

    optimizer: str | None = None
    """The optimizer whose state is resident (``"adamw"``: two tensors per parameter), counted when
    ``device_memory`` is given; ``None``: none counted (the report says so)."""

    stream_chunks: int | None = None
    """Chunks per streamed region (the ``"stream"`` pass); ``None``: the planner picks, the fewest that
    bring each region's chunk below one full-sequence hidden state (and, with a budget, under it)."""

    stream_attention: bool | None = None
    """Run attentions (causal, masked or bidirectional) by query chunks inside streamed regions:
    ``True`` always, ``False`` never, ``None`` only when the budget cannot be met otherwise (on CPU the
    chunked attention, masked against each prefix, costs more than the whole causal one: 1.5x the
    step of a 2-layer GPT at 4096 tokens against 1.15x without it)."""

    allow_approximation: bool = False
    """Let ``passes="auto"`` use the approximate few-bit activation gradients where they make the step
    fit, or fit faster, than the exact techniques alone; every site used is listed in the report."""


OPTION_NAMES = tuple(f.name for f in fields(Options))


def _normalise_passes(passes: Any) -> tuple[str, ...] | str:
    from memfit.passes import PASSES

    if passes is None:
        return ()
    if isinstance(passes, str):
        if passes == "auto":
            return "auto"
        passes = [p for p in passes.split(",") if p.strip()]
    if not isinstance(passes, Iterable):
        raise ValueError(f"passes={passes!r} must be 'auto' or a list of pass names")
    out = []
    for p in passes:
        name = str(p).strip()
        if name not in PASSES:
            accepted = ", ".join(sorted(PASSES)) or "none are available in this version"
            raise ValueError(f"unknown pass {name!r} in passes={passes!r}; accepted pass names: {accepted} (or 'auto')")
        if name not in out:
            out.append(name)
    return tuple(out)


def make_options(options: dict[str, Any] | None = None, **kwargs: Any) -> Options:
    """Validate user options (from ``options={...}`` and/or keyword arguments) into :class:`Options`."""
    from memfit.planner.cost import DEVICE_PROFILES

    merged: dict[str, Any] = dict(options or {})
    overlap = set(merged) & set(kwargs)
    if overlap:
        raise ValueError(f"options {sorted(overlap)} were given twice (in options= and as keywords); give each once")
    merged.update(kwargs)
    unknown = sorted(set(merged) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(f"unknown memfit option(s) {unknown}; accepted options: {', '.join(OPTION_NAMES)}")

    budget = parse_bytes(merged.get("budget"), what="budget")
    passes = _normalise_passes(merged.get("passes", "auto"))

    device = merged.get("device")
    if device is not None and device not in DEVICE_PROFILES:
        raise ValueError(f"unknown device profile {device!r}; accepted: {', '.join(DEVICE_PROFILES)} (or None: detect)")

    inner = merged.get("inner", "inductor")
    if inner not in INNER_COMPILERS:
        raise ValueError(f"unknown inner compiler {inner!r}; accepted: {', '.join(INNER_COMPILERS)}")

    report = merged.get("report")
    if report is not None and not isinstance(report, (str, bytes)) and not hasattr(report, "__fspath__"):
        raise ValueError(f"report={report!r} must be a file path or None")
    report = None if report is None else str(report)

    bits = merged.get("fewbit_bits", 2)
    if isinstance(bits, bool) or bits not in (1, 2, 3, 4):
        raise ValueError(f"fewbit_bits={bits!r} is not supported; accepted: 1, 2, 3, 4")
    calibration = merged.get("fewbit_calibration")
    if calibration is not None:
        from memfit.planner.fewbit import Calibration

        if not isinstance(calibration, Calibration):
            raise ValueError(
                f"fewbit_calibration={type(calibration).__name__} is not a calibration; build one with "
                "memfit.calibrate_fewbit(fn, *args)"
            )

    device_memory = parse_bytes(merged.get("device_memory"), what="device_memory")
    if device_memory is not None and budget is not None:
        raise ValueError(
            "give either budget= (the step's peak above resident memory) or device_memory= (the whole device, "
            "from which memfit subtracts what is resident), not both"
        )
    optimizer = merged.get("optimizer")
    if optimizer is not None:
        from memfit.planner.budget import OPTIMIZER_STATES

        optimizer = str(optimizer).lower()
        if optimizer not in OPTIMIZER_STATES:
            raise ValueError(f"unknown optimizer {merged.get('optimizer')!r}; accepted: {', '.join(OPTIMIZER_STATES)} (or None)")
    approx = merged.get("allow_approximation", False)
    if not isinstance(approx, bool):
        raise ValueError(f"allow_approximation={approx!r} must be True or False")

    chunks = merged.get("stream_chunks")
    if chunks is not None and (isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1):
        raise ValueError(f"stream_chunks={chunks!r} must be a positive int (or None: let the planner pick)")

    attention = merged.get("stream_attention")
    if attention not in (None, True, False):
        raise ValueError(f"stream_attention={attention!r} must be True, False or None (let the planner decide)")

    return Options(
        budget=budget,
        stream_chunks=chunks,
        stream_attention=attention,
        passes=passes,
        device=device,
        inner=inner,
        report=report,
        fewbit_bits=int(bits),
        fewbit_calibration=calibration,
        device_memory=device_memory,
        optimizer=optimizer,
        allow_approximation=approx,
    )
