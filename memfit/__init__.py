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

import importlib

__version__ = "0.1.0"

#: Where each public name lives. Imported on first use (PEP 562), so ``import memfit`` and the CLI's
#: argument checks do not pay for importing torch (5-6 s here before a typo in a path was reported).
_LAZY = {
    "MemfitBackend": "memfit.compiler.backend",
    "make_backend": "memfit.compiler.backend",
    "Options": "memfit.config",
    "make_options": "memfit.config",
    "BudgetError": "memfit.errors",
    "CantApply": "memfit.errors",
    "OptionsError": "memfit.errors",
    "UnplannedCodeError": "memfit.errors",
    "Measurement": "memfit.measurement",
    "measure": "memfit.measurement",
    "paired_times": "memfit.measurement",
    "to_loss": "memfit.measurement",
    "training_step": "memfit.measurement",
    "PendingWeightGradsError": "memfit.runtime",
    "claim_weight_grads": "memfit.runtime",
    "defer_weight_grads": "memfit.runtime",
    "discard_weight_grads": "memfit.runtime",
    "pending_weight_grads": "memfit.runtime",
    "run_weight_grads": "memfit.runtime",
    "analyze": "memfit.trace",
    "format_bytes": "memfit.units",
    "parse_bytes": "memfit.units",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    try:  # a subpackage or module (memfit.hf, memfit.planner, ...), as the eager imports once made them
        return importlib.import_module(f"memfit.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"memfit.{name}":
            raise
    raise AttributeError(f"module 'memfit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


class _BackendFactory:
    """``memfit.backend(...)``: a memfit backend for
    ``torch.compile(model, backend=memfit.backend(budget="6GiB"))``.

    Options (also accepted as ``options={...}``): ``budget`` (bytes or "6GiB"; None: no limit),
    ``passes`` ("auto" or pass names), ``device`` ("h100", "a100", "cpu"), ``inner`` ("inductor" or
    "eager"), ``report`` (a path for the report); the full list is :class:`memfit.Options`. A bad
    option raises ``ValueError`` naming it and what is accepted.

    The factory was once a module too: ``except memfit.backend.BudgetError`` (and ``OptionsError``,
    ``MemfitBackend``) keeps working.
    """

    __name__ = "backend"

    def __call__(self, options: dict | None = None, **kwargs):
        from memfit.compiler.backend import make_backend

        return make_backend(options, **kwargs)

    def __getattr__(self, name: str):
        if name in ("BudgetError", "OptionsError", "MemfitBackend"):
            return __getattr__(name)
        raise AttributeError(name)


backend = _BackendFactory()
backend.__doc__ = _BackendFactory.__doc__


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
    "UnplannedCodeError",
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
