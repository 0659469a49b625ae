"""Graph passes. Each carries out its part of a :class:`~memfit.planner.Plan`; none decides anything.

``PASSES`` maps a pass name (as users write it in ``passes=[...]``) to its implementation. A pass
is registered here when it lands; naming one that is not here is an error, never a silent no-op.
"""

from __future__ import annotations


class CantApply(Exception):
    """Raised by a pass that cannot handle a graph; the graph is left unchanged and the reason reported."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


PASSES: dict[str, str] = {
    "checkpoint": "memfit.passes.checkpoint",  # save or recompute each forward value (exact)
    "fewbit": "memfit.passes.fewbit",  # few-bit activation derivatives (approximate: only when named)
    "split_backward": "memfit.passes.split_backward",  # backward as B (input grads) + queued W (weight grads)
    "stream": "memfit.passes.stream",  # token-wise regions run in chunks along the sequence (exact)
}

#: Passes that change gradients; ``passes="auto"`` never runs them.
APPROXIMATE = frozenset({"fewbit"})

#: Exact passes that change *when* gradients arrive (W is queued until run): only when named, or
#: by the pipeline-stage adapter (``memfit.pipelining``); ``passes="auto"`` never runs them.
OPT_IN = frozenset({"split_backward", "stream"})

__all__ = ["APPROXIMATE", "OPT_IN", "PASSES", "CantApply"]
