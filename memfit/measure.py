"""Measurement: the allocator's peak during one training step, above what was resident, and wall time.

* CUDA: the caching allocator's statistics (``reset_peak_memory_stats``, then
  ``max_memory_allocated() - memory_allocated()`` taken before the step).
* CPU: the allocator's own events. With ``profile_memory=True`` the profiler records every
  allocation and free (``[memory]`` events with a signed byte count); the running sum of those,
  in time order, is the bytes allocated since the step began, and its maximum is the peak. This
  sees every allocation — kernel workspaces included — not just the tensors the model names.

Peak and time come from separate runs: the profiler slows a step, so times are taken with it off
(median of ``repeat`` runs after ``warmup`` runs, which also absorb compilation).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from memfit.config import format_bytes


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


def peak_bytes_cpu(step: Callable[[], object]) -> int:
    """Peak of the CPU allocator's running total while ``step()`` runs, from the profiler's events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


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

    The step should leave nothing behind that the next one frees (e.g. call
    ``model.zero_grad(set_to_none=True)`` first), or the frees make the steps differ.
    """
    device = torch.device(device)
    if warmup < 0 or repeat < 1:
        raise ValueError(f"warmup={warmup} must be >= 0 and repeat={repeat} >= 1")
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        peak = peak_bytes_cuda(step, device)
    else:
        peak = peak_bytes_cpu(step)
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return Measurement(peak, statistics.median(times), tuple(times), str(device))


def training_step(
    model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None, loss_fn: Callable | None = None
) -> Callable[[], None]:
    """A closure for :func:`measure`: zero grads (to None), forward, loss, backward.

    Gradients are set to None first so that each step allocates them afresh, as the first step of a
    training run does; the peak then includes the gradients, as the memory model's does. The model's
    output is held until the backward is done (as in ``out = model(x); out.loss.backward()``): the
    memory model counts the forward's outputs as live to the end of the step.
    """
    kwargs = kwargs or {}

    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = model(*args, **kwargs)
        loss = to_loss(out, loss_fn)
        loss.backward()
        del out

    return step


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
