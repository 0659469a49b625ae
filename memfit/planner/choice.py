"""The choice among candidates under a budget: every keep-or-drop rule of the planner, and the planning
margin with its constants, said once.

The compiler (``memfit.compiler``) generates candidates — the graph unchanged, a checkpoint plan,
few-bit codes, a streamed graph, a re-planned Inductor compile — and asks this module which to keep.
Nothing here compiles or rewrites a graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Under Inductor, plans aim at this fraction of the budget. The planner's FX-level model runs 2-7% under
#: the step Inductor compiles (8-layer GPT sweep: 60.19 MiB planned, 61.44 replayed; 4-layer GPT:
#: 57.12 and 61.12), and whatever the margin misses is caught by replaying the compiled buffer plan
#: and re-planning (``memfit.compiler.search.compile_inductor``). At 0.9 (before the replay existed) a
#: 4-layer GPT's exact plans were ruled out at 64.22 MiB and ``auto`` fell back to few-bit, 1.34x slower.
#: A streamed graph is planned with the margin too; once compiled, its replayed plan (which adds each stream
#: op's chunk scratch at the op) is held to the budget itself, as any compiled graph's is.
INDUCTOR_PLAN_MARGIN = 0.95

#: How many times a graph whose compiled buffer plan replays over the budget is planned again (for a
#: budget smaller by the overshoot) and recompiled, before the planner's smallest-peak plan is tried.
INDUCTOR_REPLANS = 2

#: A re-plan aims this much further below the budget than the overshoot alone says: Inductor's peak does
#: not fall one for one with the planned one.
REPLAN_SLACK = 0.98

#: Under Inductor, when the planner refuses a budget on its FX-level model but its smallest-peak plan is
#: predicted within this multiple of the budget, that plan is compiled and its buffer plan replayed before
#: refusing. The FX model can be above what Inductor compiles (issue 26 reports a small UNet at 2.95 MiB
#: modelled, 2.36 replayed, 2.38 measured: 1.25x; 1.3 covers it), and the planning margin alone refused
#: a 1-layer HF Llama at 289.13 KiB whose smallest plan was modelled at 288.38 KiB (compiled, it replays
#: to 344.63 KiB: the refusal stands, and now states a peak above the budget).
REPLAY_BEFORE_REFUSING = 1.3

#: To ask the planner for its smallest-peak plan, ask for a budget it cannot meet (this fraction of the
#: current planning budget): it then names the smallest plan it has.
SMALLEST_PLAN_SCALE = 1e-3

#: To plan for exactly the smallest reachable peak, ask for a budget this much above it (the planner's
#: comparisons are ``<=`` on integers; a ratio of exactly 1 can round below).
SMALLEST_PLAN_EPS = 1.0001

#: An approximate (few-bit) plan is kept over the best exact one only where it is predicted faster by
#: more than this factor: the cost model's error on a step is a few percent, and exactness is worth it.
APPROXIMATE_ADVANTAGE = 1.02

#: Few-bit widths tried alone, widest first: the first that fits has the least gradient error.
FEWBIT_WIDTHS = (4, 3, 2, 1)

#: The stream chunk search halves the planner's default chunk counts by these factors while the
#: predicted peak still fits: wider chunks run faster (``memfit.compiler.search.fewer_chunks``).
FEWER_CHUNK_FRACTIONS = (0.5, 0.25, 0.125)

#: The stream search's last steps: every region, attentions by query chunks, chunk counts times these.
STREAM_CHUNK_MULTIPLIERS = (1, 2, 4, 8)


#: ``passes="auto"`` weighs stream plans only where the plan without streaming is predicted slower than
#: the unchanged step by more than this factor: streaming itself costs time (on CPU 1.8x its chunk
#: graphs' roofline and a cost per node and chunk; the LM head alone, the cheapest region to stream, is
#: 20-40% of a small GPT's step), so it can only win against more recomputation than that.
STREAM_SEARCH_FROM = 1.03


#: A budget below a graph's :class:`~memfit.planner.budget.StepFloor` (its parameters' gradients, its
#: largest single op) is refused before any planning. Read at call time: set it False to plan anyway,
#: for the smallest peak memfit can reach (``BudgetError.smallest_peak`` of a refused 1-byte budget).
REFUSE_BELOW_FLOOR = True


#: The most stream configurations the auto search plans (each a fake-tensor analysis with a checkpoint
#: plan: 2-7 s on examples/gpt.py); a count, not a time, so that the same graph gets the same plan on
#: any load. The search weighs the smallest subsets first (the LM head alone, then 2 regions, ...).
STREAM_SEARCH_PROBES = 10


def stream_subsets(n: int) -> list[int | None]:
    """Which region subsets the auto search weighs among ``n`` regions: the 1, 2, 4, ... largest, then
    every region (None). Geometric, so a 32-layer model's 33 regions cost 7 subsets, not 33."""
    out, k = [], 1
    while k < n:
        out.append(k)
        k *= 2
    return out + [None]


def plan_margin(fused: bool) -> float:
    """The fraction of the budget a plan aims at: ``INDUCTOR_PLAN_MARGIN`` under Inductor (``fused``:
    what the planner's model of a compiled step can miss), 1 under the eager inner compiler (exact
    there). Read at call time, so a test may set the constant."""
    return INDUCTOR_PLAN_MARGIN if fused else 1.0


def refusal_margin(fused: bool, passes) -> float:
    """The margin a refusal states: the planning margin where a checkpoint plan was asked for (it aims at
    ``plan_margin``), none where only techniques that plan no margin were enabled."""
    return plan_margin(fused) if "checkpoint" in passes else 1.0


def planning_target(budget: int, fused: bool) -> int:
    """The peak a plan aims at for ``budget``."""
    return int(budget * plan_margin(fused))


@dataclass
class Candidate:
    """One combination of passes the auto planner evaluated for a graph."""

    label: str
    fw: Any
    bw: Any
    pair: Any
    analysis: Any
    plan: Any = None
    fewbit: Any = None
    joint: Any = None
    share: Any = None
    """The :class:`~memfit.planner.share_norms.SharePlan` carried out in ``joint`` (None: not shared)."""
    exact: bool = True
    over_budget: bool = False
    """The smallest-peak plan kept because none fits (its fused peak may still be under the budget: it
    missed the plan's margin)."""
    notes: list[str] = field(default_factory=list)
    curve: tuple = ()

    def fits(self, budget: int | None) -> bool:
        return budget is None or (not self.over_budget and self.peak <= budget)

    @property
    def peak(self) -> int:
        return self.analysis.memory.peak_bytes

    @property
    def time_s(self) -> float:
        return self.analysis.time_s

    def row(self, budget: int | None, *, chosen: bool) -> dict:
        return {
            "label": self.label,
            "peak": self.peak,
            "time_s": self.time_s,
            "fits": self.fits(budget),
            "exact": self.exact,
            "chosen": chosen,
            "curve": [list(p) for p in self.curve],
        }


def choose(cands: list[Candidate], budget: int | None) -> tuple[Candidate | None, Candidate | None]:
    """The candidate of least predicted step time whose predicted peak fits, exact preferred: an
    approximate one is kept only where no exact one fits, or where it is predicted faster by more than
    ``APPROXIMATE_ADVANTAGE``. Returns (chosen or None when nothing fits, the best exact one)."""
    fits = [c for c in cands if c.fits(budget)]
    exact = min((c for c in fits if c.exact), key=lambda c: c.time_s, default=None)
    approx = min((c for c in fits if not c.exact), key=lambda c: c.time_s, default=None)
    if exact is not None and (approx is None or exact.time_s <= APPROXIMATE_ADVANTAGE * approx.time_s):
        return exact, exact
    return approx, exact


def smallest_peak(cands: list[Candidate]) -> Candidate:
    """What is kept when nothing fits and the caller asked for a report rather than an error."""
    return min(cands, key=lambda c: c.peak)


def fewbit_helps(before_peak: int, after_peak: int) -> bool:
    """Keep a few-bit rewrite only where it lowers the predicted peak: where the partition already
    saves only what the codes would replace, codes are pure cost (approximate gradients, coding time)."""
    return after_peak < before_peak


def fits_exactly(records: list, infeasible: list, budget: int, margin: float = 1.0) -> bool:
    """Whether a compile attempt's graphs fit ``budget * margin`` with exact techniques only (no few-bit
    plan, no graph that no plan fitted)."""
    return not infeasible and all(r.fewbit is None and r.peak_bytes <= budget * margin for r in records)


def keep_streamed(streamed_peak: int, plain_peak: int) -> bool:
    """Between two compiles of which neither fits exactly, keep the one of lower peak."""
    return streamed_peak < plain_peak


__all__ = [
    "APPROXIMATE_ADVANTAGE",
    "FEWBIT_WIDTHS",
    "FEWER_CHUNK_FRACTIONS",
    "INDUCTOR_PLAN_MARGIN",
    "INDUCTOR_REPLANS",
    "REFUSE_BELOW_FLOOR",
    "REPLAN_SLACK",
    "REPLAY_BEFORE_REFUSING",
    "SMALLEST_PLAN_EPS",
    "SMALLEST_PLAN_SCALE",
    "STREAM_CHUNK_MULTIPLIERS",
    "STREAM_SEARCH_FROM",
    "STREAM_SEARCH_PROBES",
    "Candidate",
    "choose",
    "fewbit_helps",
    "fits_exactly",
    "keep_streamed",
    "plan_margin",
    "planning_target",
    "refusal_margin",
    "smallest_peak",
    "stream_subsets",
]
