"""memfit: make a PyTorch training step fit a memory budget.

Public API::

    torch.compile(model, backend="memfit", options={"budget": "6GiB"})
    torch.compile(model, backend=memfit.backend(budget="6GiB", inner="eager"))
    memfit.measure(step)                 # measured peak bytes and wall time of one step
    memfit.analyze(factory)              # the memory model of a model's step, on fake tensors
"""

from memfit.backend import MemfitBackend, backend
from memfit.config import Options, format_bytes, make_options, parse_bytes
from memfit.measure import Measurement, measure
from memfit.trace import analyze

__version__ = "0.1.0"

__all__ = [
    "MemfitBackend",
    "Measurement",
    "Options",
    "analyze",
    "backend",
    "format_bytes",
    "make_options",
    "measure",
    "parse_bytes",
]
