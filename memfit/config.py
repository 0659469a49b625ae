"""Options for the memfit backend.

Options are a frozen dataclass so that a set of options is hashable (it becomes part of a compile
cache key) and cannot drift between the graphs of one model. Every constructor path —
``torch.compile(..., backend="memfit", options={...})``, ``memfit.backend(**kwargs)`` and the CLI —
goes through :func:`make_options`, so a bad value gets the same message everywhere: it names the bad
value and lists what is accepted. Byte sizes are parsed by :mod:`memfit.units`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Iterable

from memfit.units import format_bytes, parse_bytes  # noqa: F401  (re-exported: memfit.config.format_bytes)

INNER_COMPILERS = ("inductor", "eager")


@dataclass(frozen=True, kw_only=True)
class Options:
    """What the user asked of the backend. Build with :func:`make_options`, which validates."""

    budget: int | None = None
    """Peak bytes the training step may use above what is resident before it; ``None``: no limit."""

    passes: tuple[str, ...] | str = "auto"
    """Pass names to run (see ``memfit.techniques``), or ``"auto"``: let the planner choose."""

    device: str | None = None
    """Device profile for the cost model (``"h100"``, ``"a100"``, ``"cpu"``); ``None``: the device of
    the graph's inputs."""

    inner: str = "inductor"
    """Compiler that runs the rewritten graphs: ``"inductor"`` or ``"eager"`` (for debugging)."""

    report: str | None = None
    """Path of a JSON report of every graph compiled and every decision; ``None``: no file."""

    fewbit_bits: int = 2
    """Bits per element of the few-bit activation codes (1..4), when ``"fewbit"`` is among the
    passes. The few-bit pass is approximate: ``"auto"`` weighs it only with ``allow_approximation=True``
    (alone at 4, 3, 2, 1 bits, and at this width with a checkpoint plan)."""

    fewbit_calibration: Any = None
    """A ``memfit.calibrate_fewbit(...)`` result: weight the few-bit tables by the measured inputs of
    each activation kind instead of a standard normal."""

    fewbit_tables: str = "optimal"
    """Which piecewise-constant derivatives the few-bit codes look up: ``"optimal"`` (least derivative
    error for the weighting) or ``"approx_bp"`` (Approx-BP's ReGELU2 / ReSiLU2 for GELU and SiLU at 2
    bits; other activations keep the optimal table). See ``docs/fewbit.md`` for the two compared."""

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

    strict: bool = False
    """Refuse (``memfit.UnplannedCodeError``) instead of warning when part of a budgeted step runs
    outside memfit's graphs (a graph break's eager code), where memfit cannot keep the budget."""


OPTION_NAMES = tuple(f.name for f in fields(Options))

#: Device profiles for time estimates (``memfit.planner.cost`` holds their numbers). Here, with the
#: other option vocabularies, so that options and CLI arguments are checked without importing torch.
DEVICE_PROFILES = ("h100", "a100", "cpu")

#: Optimizer state tensors per parameter, in the parameter's dtype (``device_memory=`` subtracts them).
OPTIMIZER_STATES = {
    "sgd": 0,
    "momentum": 1,
    "sgd_momentum": 1,
    "rmsprop": 1,
    "adagrad": 1,
    "lion": 1,
    "adam": 2,
    "adamw": 2,
}


def split_target(target: str) -> tuple[str, str, bool]:
    """A CLI or ``memfit.analyze`` TARGET, ``file.py[:name]`` or ``pkg.module[:name]``, as (path or module,
    factory name, whether it is a file). Here, without torch, so the CLI can check it before importing it."""
    import re

    m = re.match(r"^(.*):([A-Za-z_][A-Za-z0-9_]*)$", target)
    path, name = (m.group(1), m.group(2)) if m else (target, "factory")
    return path, name, path.endswith(".py") or os.sep in path


def report_paths(path: str) -> list[str]:
    """The files a report at ``path`` is written as: ``path`` and the other two forms beside it (same
    stem). Raises ValueError for an extension that is not .html, .htm, .md or .json; the CLI checks it
    with its other arguments, so a typo costs no planning time (a Llama-3-8B plan takes about 40 s).
    (The backend's ``report=`` also takes any other path, for a JSON record of every graph.)"""
    stem, ext = os.path.splitext(path)
    ext = ext.lower()
    if ext not in (".html", ".htm", ".md", ".json"):
        raise ValueError(f"report path {path!r} must end in .html, .md or .json (the other forms are written beside it)")
    return [path] + [stem + e for e in (".html", ".md", ".json") if e != ext and not (ext == ".htm" and e == ".html")]


def _normalise_passes(passes: Any) -> tuple[str, ...] | str:
    from memfit.techniques import PASSES

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


def _writable_report(path: str) -> str:
    """``report=`` checked where it enters: a report that cannot be written would otherwise fail after the
    whole compile, inside Dynamo's ``BackendCompilerFailed``. Its folder is created when the report is
    written, so the nearest existing ancestor must be a writable folder."""
    if not path or os.path.isdir(path):
        raise ValueError(f"report={path!r} is a folder; give a file path such as 'memfit.html' or 'plans/memfit.json'")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"report={path!r} cannot be written: {folder!r} is not a writable folder; give a path "
                         "in a folder you can write to")
    return path


def make_options(options: dict[str, Any] | None = None, **kwargs: Any) -> Options:
    """Validate user options (from ``options={...}`` and/or keyword arguments) into :class:`Options`."""
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
    report = None if report is None else _writable_report(os.fspath(report) if not isinstance(report, bytes) else os.fsdecode(report))

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

    from memfit.kernels.fewbit_tables import TABLE_SOURCES

    fewbit_tables = merged.get("fewbit_tables", "optimal")
    if fewbit_tables not in TABLE_SOURCES:
        raise ValueError(f"fewbit_tables={fewbit_tables!r} is not known; accepted: {', '.join(TABLE_SOURCES)}")
    if fewbit_tables == "approx_bp" and bits != 2:
        raise ValueError(f"fewbit_tables='approx_bp' has 2-bit tables only; got fewbit_bits={bits} (set fewbit_bits=2)")

    device_memory = parse_bytes(merged.get("device_memory"), what="device_memory")
    if device_memory is not None and budget is not None:
        raise ValueError(
            "give either budget= (the step's peak above resident memory) or device_memory= (the whole device, "
            "from which memfit subtracts what is resident), not both"
        )
    optimizer = merged.get("optimizer")
    if optimizer is not None:
        optimizer = str(optimizer).lower()
        if optimizer not in OPTIMIZER_STATES:
            raise ValueError(f"unknown optimizer {merged.get('optimizer')!r}; accepted: {', '.join(OPTIMIZER_STATES)} (or None)")
    approx = merged.get("allow_approximation", False)
    if not isinstance(approx, bool):
        raise ValueError(f"allow_approximation={approx!r} must be True or False")

    strict = merged.get("strict", False)
    if not isinstance(strict, bool):
        raise ValueError(f"strict={strict!r} must be True or False")

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
        fewbit_tables=fewbit_tables,
        device_memory=device_memory,
        optimizer=optimizer,
        allow_approximation=approx,
        strict=strict,
    )
