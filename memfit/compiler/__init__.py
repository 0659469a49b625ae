"""The compiler: the ``torch.compile`` backend and what it runs for one graph.

* ``backend``: :class:`~memfit.compiler.backend.MemfitBackend`, the options, the entry point, the
  committed records and the report;
* ``search``: the searches that run compile attempts and keep one;
* ``attempt``: one compile attempt as a value (partition callback, inner compile, records);
* ``planning``: how a partition drives each technique (auto's candidates, named passes, the split);
* ``inner``: the inner compilers (eager, Inductor with buffer-plan capture, split backward);
* ``records``: :class:`~memfit.compiler.records.GraphRecord`.
"""

from memfit.compiler.backend import MemfitBackend, make_backend, registered_backend
from memfit.compiler.records import GraphRecord

__all__ = ["GraphRecord", "MemfitBackend", "make_backend", "registered_backend"]
