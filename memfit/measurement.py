"""Measurement: the allocator's peak during one training step, above what was resident, and wall time.

* CUDA: the caching allocator's statistics (``reset_peak_memory_stats``, then
  ``max_memory_allocated() - memory_allocated()`` taken before the step).
* CPU: the allocator's own events. With ``profile_memory=True`` the profiler records every
  allocation and free (address and signed byte count); the running sum of those, in time order,
  is the bytes allocated since the step began, and its maximum is the peak. This sees every
  allocation — kernel workspaces included — not just the tensors the model names. Frees of blocks
  allocated before the step are left out: the profiler remembers addresses across sessions, and
  a block freed now whose address it saw allocated in an earlier session would otherwise subtract
  a stale size (we saw the measured peak drift down 13% over three measurements without this).

A step's ``before`` attribute, if it has one, runs before the baseline is taken, outside the
measured window: :func:`training_step` uses it to set gradients to None, so the step allocates
them afresh (as the memory model assumes) and freeing the old ones does not lower the peak.

Peak and time come from separate runs: the profiler slows a step, so times are taken with it off
(median of ``repeat`` runs after ``warmup`` runs, which also absorb compilation).
"""

from __future__ import annotations

import contextlib
import os
import sys
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from memfit.units import format_bytes


@dataclass(frozen=True)
class Measurement:
    peak_bytes: int
    """Peak bytes allocated during the step above what was allocated before it."""
    time_s: float
    """Median wall time of one step, in seconds."""
    times_s: tuple[float, ...]
    device: str

    def __str__(self) -> str:
        return f"peak {format_bytes(self.peak_bytes)}, {self.time_s * 1e3:.2f} ms/step ({self.device})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 sent to /dev/null while the profiler starts or stops: kineto writes
    "USDT: ... profiler_start" / "profiler_stop" there from C++ on every session (no setting turns it
    off in torch 2.13; KINETO_LOG_LEVEL does not), which leaked into ``memfit bench`` and the
    examples' output. Only these two calls are silenced, never the step."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (an embedded interpreter): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_window(step: Callable[[], object]) -> tuple[int, int]:
    """(peak, still live at the end) of the CPU allocator's running total over blocks allocated
    while ``step()`` runs, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    from torch._C._profiler import _EventType

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.start()
    try:
        step()
    finally:
        with _quiet_stderr():
            prof.stop()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.ptr, e.extra_fields.alloc_size))
    events.sort(key=lambda t: t[0])
    mine: dict[int, int] = {}  # address -> size, for blocks allocated inside the window
    live = peak = 0
    for _, ptr, size in events:
        if size > 0:
            mine[ptr] = size
            live += size
            peak = max(peak, live)
        elif ptr in mine:
            live -= mine.pop(ptr)
    return peak, live


def peak_bytes_cpu(step: Callable[[], object]) -> int:
    """Peak of the CPU allocator's running total while ``step()`` runs, from the profiler's events."""
    return _cpu_window(step)[0]


def retained_bytes(step: Callable[[], object], device: str | torch.device = "cpu") -> int:
    """Bytes allocated while ``step()`` runs that are still allocated when it returns (what it left
    alive: e.g. what a split backward holds for W). Measured by the allocator, not counted."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device) - before
    return _cpu_window(step)[1]


def peak_bytes_cuda(step: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def measure(
    step: Callable[[], object],
    *,
    device: str | torch.device = "cpu",
    warmup: int = 1,
    repeat: int = 3,
) -> Measurement:
    """Measure one training step: ``step()`` runs forward and backward (and whatever else it does).

    If ``step`` has a ``before`` attribute (see :func:`training_step`), it runs before every step,
    outside the measured window and the timing.
    """
    device = torch.device(device)
    if warmup < 0 or repeat < 1:
        raise ValueError(f"warmup={warmup} must be >= 0 and repeat={repeat} >= 1")
    before = getattr(step, "before", None) or (lambda: None)
    for _ in range(warmup):
        before()
        step()
    before()
    _sync(device)
    if device.type == "cuda":
        peak = peak_bytes_cuda(step, device)
    else:
        peak = peak_bytes_cpu(step)
    times = [_timed(step, device) for _ in range(repeat)]
    return Measurement(peak, statistics.median(times), tuple(times), str(device))


def _timed(step: Callable[[], object], device: torch.device) -> float:
    """Seconds of one ``step()``, its ``before`` run first and outside the timing."""
    (getattr(step, "before", None) or (lambda: None))()
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - t0


def paired_times(steps: list[Callable[[], object]], *, rounds: int = 7, device: str | torch.device = "cpu") -> list[float]:
    """Median seconds per step of ``steps`` run in turn, one step of each per round, ``rounds`` times.

    For comparing configurations on a shared machine: a change of load during the run hits them all
    alike. Measured one after another, the same graphs' times differed by up to 1.39x on this 2-core
    machine (``benchmarks/auto_planner.py``); paired, by 0.97-1.03x. The steps must be compiled
    already (a first call that compiles would count as a step)."""
    device = torch.device(device)
    if rounds < 1 or not steps:
        raise ValueError(f"rounds={rounds} must be >= 1 and steps must not be empty")
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(rounds):
        for step, out in zip(steps, times):
            out.append(_timed(step, device))
    return [statistics.median(t) for t in times]


def training_step(
    model: torch.nn.Module | Callable, args: tuple = (), kwargs: dict | None = None, loss_fn: Callable | None = None
) -> Callable[[], None]:
    """A closure for :func:`measure`: forward, loss, backward; its ``before`` sets grads to None.

    Gradients are set to None before each step so that it allocates them afresh, as the first step
    of a training run does; the peak then includes the gradients, as the memory model's does. The model's
    output is held until the backward is done (as in ``out = model(x); out.loss.backward()``): the
    memory model counts the forward's outputs as live to the end of the step.

    ``model`` may be a module or any callable, such as a compiled function that calls one (the form the
    docs advise for a Hugging Face model with its loss): without ``zero_grad``, the leaves whose
    gradients the first step accumulated are found on its autograd graph and reset before each step.
    """
    kwargs = kwargs or {}
    leaves: list | None = None if hasattr(model, "zero_grad") else []

    def step() -> None:
        out = model(*args, **kwargs)
        loss = to_loss(out, loss_fn)
        if leaves == []:
            leaves.extend(_grad_leaves(loss))
        loss.backward()
        del out

    def before() -> None:
        if leaves is None:
            model.zero_grad(set_to_none=True)
        else:
            for p in leaves:
                p.grad = None

    step.before = before  # type: ignore[attr-defined]
    return step


def _grad_leaves(loss: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors whose ``.grad`` a backward of ``loss`` accumulates into (its AccumulateGrad nodes)."""
    seen, out, stack = set(), [], [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        leaf = getattr(fn, "variable", None)
        if isinstance(leaf, torch.Tensor):
            out.append(leaf)
        stack.extend(f for f, _ in getattr(fn, "next_functions", ()))
    return out


def to_loss(out, loss_fn: Callable | None = None) -> torch.Tensor:
    """The scalar to differentiate: ``loss_fn(out)``, else ``out`` itself, ``out.loss`` (HF), or ``out[0]``."""
    if loss_fn is not None:
        return loss_fn(out)
    if isinstance(out, torch.Tensor) and out.dim() == 0:
        return out
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.dim() == 0:
        return loss
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor) and out[0].dim() == 0:
        return out[0]
    raise ValueError(
        "the model's output is not a scalar loss; return a loss function from the factory "
        "(model, inputs, loss_fn) or make the model return the loss"
    )
