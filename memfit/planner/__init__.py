"""The planner: from a graph and a budget to what each pass is to do.

* :mod:`~memfit.planner.cost` (roofline time per node, device profiles) and
  :mod:`~memfit.planner.memory` (buffer lifetimes and the step's peak), combined per step by
  :mod:`~memfit.planner.analysis`;
* one planner per technique, each choosing what its pass carries out: :mod:`~memfit.planner.checkpoint`
  (save or recompute: a 0-1 program), :mod:`~memfit.planner.stream` (token-wise regions and their
  chunk counts), :mod:`~memfit.planner.fewbit` (which activations save few-bit codes),
  :mod:`~memfit.planner.split_backward` (B/W split) with :mod:`~memfit.planner.schedule` (pipeline
  schedules);
* :mod:`~memfit.planner.choice` (which candidate to keep under a budget), :mod:`~memfit.planner.budget`
  (the step's budget), :mod:`~memfit.planner.inductor_plan` (Inductor's own buffer plans, replayed by
  the memory model) and :mod:`~memfit.planner.report`.

The models of memfit's own opaque ops come from :mod:`memfit.kernels` (``op_models``), looked up when a
model runs, so importing the planner does not import the kernels.
"""

from memfit.planner.analysis import NodeCost, StepAnalysis, analyze_pairs
from memfit.planner.cost import DEVICE_PROFILES, DeviceProfile, get_profile
from memfit.planner.memory import GraphPair, MemoryModel, simulate

__all__ = [
    "DEVICE_PROFILES",
    "DeviceProfile",
    "GraphPair",
    "MemoryModel",
    "NodeCost",
    "StepAnalysis",
    "analyze_pairs",
    "get_profile",
    "simulate",
]
