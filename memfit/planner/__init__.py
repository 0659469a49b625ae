"""Cost model, memory model and (later) the solver that turns a budget into a Plan."""

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
