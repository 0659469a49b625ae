"""memfit: make a PyTorch training step fit a memory budget.

Public API::

    torch.compile(model, backend="memfit", options={"budget": "6GiB"})
    torch.compile(model, backend=memfit.backend(budget="6GiB", inner="eager"))
    memfit.measure(step)                 # measured peak bytes and wall time of one step
    memfit.analyze(factory)              # the memory model of a model's step, on fake tensors
    memfit.calibrate_fewbit(model, x)    # measured activation inputs, for few-bit tables
    memfit.run_weight_grads()            # run the weight gradients a split backward queued
    memfit.pipelining.pipeline_stage(..) # a memfit-compiled stage for torch.distributed.pipelining
"""

from memfit.backend import MemfitBackend, backend
from memfit.config import Options, format_bytes, make_options, parse_bytes
from memfit.measure import Measurement, measure
from memfit.runtime import (
    PendingWeightGradsError,
    claim_weight_grads,
    discard_weight_grads,
    pending_weight_grads,
    run_weight_grads,
)
from memfit.trace import analyze

__version__ = "0.1.0"


def calibrate_fewbit(fn, *args, **kwargs):
    """Histogram the inputs of every activation ``fn(*args, **kwargs)`` runs (eagerly, no grad); pass the
    result as ``fewbit_calibration=`` to weight the few-bit tables by it. See
    :func:`memfit.passes.fewbit.calibrate`."""
    from memfit.passes.fewbit import calibrate

    return calibrate(fn, *args, **kwargs)

__all__ = [
    "MemfitBackend",
    "PendingWeightGradsError",
    "claim_weight_grads",
    "discard_weight_grads",
    "pending_weight_grads",
    "run_weight_grads",
    "Measurement",
    "Options",
    "analyze",
    "calibrate_fewbit",
    "backend",
    "format_bytes",
    "make_options",
    "measure",
    "parse_bytes",
]
