"""What memfit did with one training graph: the record a compile attempt leaves, which the backend
commits when it keeps the attempt, and which reports, the CLI and tests read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from memfit.planner.analysis import StepAnalysis
from memfit.planner.memory import GraphPair


@dataclass
class GraphRecord:
    """What memfit did with one training graph."""

    name: str
    pair: GraphPair
    analysis: StepAnalysis
    partition: str
    notes: list[str] = field(default_factory=list)
    """Lines of the record (:class:`memfit.errors.Note`: text, technique and reason code)."""
    frame: Any = None
    """Dynamo's frame id: a recompile (new shapes, say) of the same code has the same frame."""
    plan: Any = None
    """The checkpoint plan carried out, if any."""
    fewbit: Any = None
    """The few-bit plan carried out, if any."""
    split: Any = None
    """The split-backward plan carried out, if any."""
    share: Any = None
    """The share-norms plan carried out, if any."""
    before_pair: GraphPair | None = None
    before: StepAnalysis | None = None
    """The analysis of the graph as plain ``torch.compile`` would partition it (no memfit pass)."""
    budget: Any = None
    """The :class:`memfit.planner.budget.StepBudget` the graph was planned for."""
    candidates: list = field(default_factory=list)
    """Every combination the planner evaluated: label, predicted peak, predicted time, fits, exact, chosen."""
    decisions: list = field(default_factory=list)
    """One row per value a pass decided about (see ``memfit.planner.report.decision_rows``)."""
    buffer_plans: dict = field(default_factory=dict)
    """Inductor's buffer plans of the compiled graphs, ``{"g0.fw": BufferPlan, "g0.bw": ...}``
    (see ``memfit.planner.inductor_plan``); empty under the eager inner compiler."""
    compiled: Any = None
    """The memory model replayed from ``buffer_plans`` (``memory.MemoryModel``): this graph's step as
    Inductor compiled it. None when there is no plan to replay."""

    @property
    def peak_bytes(self) -> int:
        """The best prediction of this graph's step peak: Inductor's compiled plan where there is one."""
        return (self.compiled or self.analysis.memory).peak_bytes

    def to_json(self) -> dict:
        out = {
            "name": self.name,
            "partition": self.partition,
            "notes": list(self.notes),
            "analysis": self.analysis.to_json(),
            "candidates": list(self.candidates),
            "decisions": list(self.decisions),
        }
        if self.compiled is not None:
            out["compiled_peak_bytes"] = self.compiled.peak_bytes
        if self.before is not None:
            out["before"] = self.before.to_json()
        if self.budget is not None:
            out["budget"] = self.budget.to_json()
        if self.plan is not None:
            out["checkpoint_plan"] = self.plan.to_json()
        if self.fewbit is not None:
            out["fewbit_plan"] = self.fewbit.to_json()
        if self.split is not None:
            out["split_backward_plan"] = self.split.to_json()
        if self.share is not None:
            out["share_norms_plan"] = self.share.to_json()
        return out


__all__ = ["GraphRecord"]
