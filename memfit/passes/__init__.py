"""Graph passes, one per file. Each carries out its part of a plan the planner made; none decides
anything, and one that cannot handle a graph raises :class:`~memfit.errors.CantApply` and leaves the
graph unchanged.

Which passes exist, and when each runs, is said once, in :mod:`memfit.techniques` (re-exported here:
``PASSES``, ``APPROXIMATE``, ``OPT_IN``). Naming a pass that is not there is an error, never a silent
no-op.
"""

from __future__ import annotations

from memfit.errors import CantApply
from memfit.techniques import APPROXIMATE, OPT_IN, PASSES

__all__ = ["APPROXIMATE", "OPT_IN", "PASSES", "CantApply"]
