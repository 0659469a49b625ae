"""memfit: make a PyTorch training step fit a memory budget.

Public API (one flat surface: no name here is also a module of the package)::

    torch.compile(model, backend="memfit", options={"budget": "6GiB"})
    torch.compile(model, backend=memfit.backend(budget="6GiB", inner="eager"))
    memfit.BudgetError, memfit.OptionsError   # no plan fits; a bad option
    memfit.measure(memfit.training_step(compiled, args))   # measured peak bytes and wall time of one step
    memfit.analyze(factory)              # the memory model of a model's step, on fake tensors
    memfit.calibrate_fewbit(model, x)    # measured activation inputs, for few-bit tables
    memfit.defer_weight_grads()          # a context: a split backward queues its weight gradients (W)
    memfit.run_weight_grads()            # run the W queued
    memfit.pipelining.pipeline_stage(..) # a memfit-compiled stage for torch.distributed.pipelining

The modules behind them are listed in ``docs/layout.md``. Older spellings keep working:
``memfit.backend.BudgetError`` (and ``OptionsError``, ``MemfitBackend``) are attributes of the factory.
"""

from memfit.compiler.backend import MemfitBackend, make_backend
from memfit.config import Options, make_options
from memfit.errors import BudgetError, CantApply, OptionsError
from memfit.measurement import Measurement, measure, paired_times, to_loss, training_step
from memfit.runtime import (
    PendingWeightGradsError,
    claim_weight_grads,
    defer_weight_grads,
    discard_weight_grads,
    pending_weight_grads,
    run_weight_grads,
)
from memfit.trace import analyze
from memfit.units import format_bytes, parse_bytes

__version__ = "0.1.0"


def backend(options: dict | None = None, **kwargs) -> MemfitBackend:
    """A memfit backend for ``torch.compile(model, backend=memfit.backend(budget="6GiB"))``.

    Options (also accepted as ``options={...}``): ``budget`` (bytes or "6GiB"; None: no limit),
    ``passes`` ("auto" or pass names), ``device`` ("h100", "a100", "cpu"), ``inner`` ("inductor" or
    "eager"), ``report`` (a path for the report); the full list is :class:`memfit.Options`. A bad
    option raises ``ValueError`` naming it and what is accepted.
    """
    return make_backend(options, **kwargs)


# The factory was once a module too: ``except memfit.backend.BudgetError`` keeps working.
backend.BudgetError = BudgetError  # type: ignore[attr-defined]
backend.OptionsError = OptionsError  # type: ignore[attr-defined]
backend.MemfitBackend = MemfitBackend  # type: ignore[attr-defined]


def calibrate_fewbit(fn, *args, **kwargs):
    """Histogram the inputs of every activation ``fn(*args, **kwargs)`` runs (eagerly, no grad); pass the
    result as ``fewbit_calibration=`` to weight the few-bit tables by it. See
    :func:`memfit.passes.fewbit.calibrate`."""
    from memfit.passes.fewbit import calibrate

    return calibrate(fn, *args, **kwargs)


__all__ = [
    "BudgetError",
    "CantApply",
    "MemfitBackend",
    "Measurement",
    "Options",
    "OptionsError",
    "PendingWeightGradsError",
    "analyze",
    "backend",
    "calibrate_fewbit",
    "claim_weight_grads",
    "defer_weight_grads",
    "discard_weight_grads",
    "format_bytes",
    "make_options",
    "measure",
    "paired_times",
    "parse_bytes",
    "pending_weight_grads",
    "run_weight_grads",
    "to_loss",
    "training_step",
]
