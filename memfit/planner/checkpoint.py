"""Checkpoint planner: which forward values to save so the step's *peak* fits an absolute budget.

Formulation (one 0-1 program per probe, solved by HiGHS through ``scipy.optimize.milp``):

* variables per forward value j: ``s_j`` (saved) and ``r_j`` (recomputed in the backward);
* every forward value the backward reads: ``s_j + r_j >= 1``;
* closure: a recomputed value's forward inputs are saved or recomputed, ``s_k + r_k >= r_j``;
* locality: across a layer boundary (module paths ``...layers.3`` / ``h.3``, from the graph's
  ``nn_module_stack``) the input must be *saved*, ``s_k >= r_j``. This bounds every recompute chain
  to one layer, which is what keeps recomputation in the backward from holding a whole model's
  activations at once (PyTorch's knapsack has no such constraint: pytorch/pytorch#197838, 1144 MB
  at budget 0.05 against 275 MB at 0.15);
* random ops, values the user or PyTorch tagged must-save: never recomputed; user
  ``torch.utils.checkpoint`` regions (recompute tags): never saved unless random; views and
  ``getitem``s are never saved themselves (their base is);
* minimise recompute time (roofline: max(FLOPs/peak, bytes/bandwidth), so pointwise ops cost the
  bytes they move) subject to ``sum(bytes_j * s_j) <= B``.

Layers of one structure are planned once (:mod:`memfit.planner.layers`): each distinct layer's
(bytes, time) frontier is computed once, and each probe chooses one frontier point per layer.

The sum of saved bytes is not the peak, so ``B`` is searched: each probe's plan is carried out
(the checkpoint pass) and its peak simulated by the memory model, recomputation placement
included; bisection finds the largest ``B`` whose simulated peak fits the budget. The smallest ``B``
(minimum saved bytes) gives the smallest peak memfit reports as reachable when nothing fits.
"""

from __future__ import annotations

import operator
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.fx
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from memfit.planner.cost import DeviceProfile, is_random, is_view, node_time, tensor_bytes
from memfit.planner.shapes import data_dependent
from memfit.units import format_bytes


#: Branch-and-bound nodes per probe, tried in turn until one finds a plan (see :meth:`Problem.solve`).
NODE_LIMITS = (1, 100, 10_000)
#: Seconds after which a probe stops whatever its node count (a guard; no probe has reached it here).
SAFETY_S = 120.0
#: Whether probes solve repeated layers once (:mod:`memfit.planner.layers`) where the split applies. Off:
#: measured slower than the whole program everywhere it applies (8-block GPT: frontier 0.65 s, then 10
#: probes 2.5 s against the whole program's 0.3 s; 32 blocks: 3.9 s against 1.3 s), and refused on Llama
#: blocks (frontiers of 124-351 points), while the node-limited whole program already gives the same plan
#: on every load within 1% of optimal. ``Problem.solve(by_layer=True)`` asks for it.
BY_LAYER = False


@dataclass(frozen=True)
class CheckpointPlan:
    """The decision for one graph: save these forward values, recompute the rest the backward needs."""

    saved: frozenset[str]
    recomputed: frozenset[str]
    budget: int
    predicted_peak: int
    recompute_time_s: float
    saved_bytes: int
    probes: int = 0
    plan_time_s: float = 0.0
    frontier: tuple[tuple[int, float], ...] = ()
    """(simulated peak, recompute time) of every plan the search evaluated, the chosen one among them:
    the budget-vs-time curve the report plots, at no extra planning cost."""

    def to_json(self) -> dict:
        return {
            "budget": self.budget,
            "predicted_peak": self.predicted_peak,
            "saved_bytes": self.saved_bytes,
            "recompute_time_s": self.recompute_time_s,
            "saved": sorted(self.saved),
            "recomputed": sorted(self.recomputed),
            "probes": self.probes,
            "plan_time_s": self.plan_time_s,
            "frontier": [list(p) for p in self.frontier],
        }


@dataclass
class Probe:
    limit: float
    saved: frozenset[str]
    recomputed: frozenset[str]
    cost: float
    saved_bytes: int
    peak: int | None = None
    result: object = field(default=None, repr=False)
    layer_points: tuple[int, ...] = ()
    """When solved by layer: the frontier point each repeated layer took (equal indices in one class:
    the same decision repeated)."""


class Infeasible(Exception):
    def __init__(
        self, smallest_peak: int, budget: int, smallest: "CheckpointPlan | None" = None, result: object = None,
        limits: tuple[str, ...] = (),
    ):
        self.smallest_peak = smallest_peak
        self.limits = limits
        """What the planner could not choose (:func:`_limits`), for the error."""
        self.budget = budget
        self.smallest = smallest
        """The plan of the smallest peak (for a report of what does not fit), and its ``evaluate`` result."""
        self.result = result
        super().__init__(f"smallest reachable peak {smallest_peak} > budget {budget}")


_REPEATED = re.compile(r"(?:^|[._])(?:layers|h|blocks|layer|block|decoder_layers|encoder_layers)[._](\d+)")
_NUMBERED = re.compile(r"[._](\d+)(?=$|[._])")


def _layer_of(node: torch.fx.Node) -> str | None:
    """The layer key of a node, from its module stack: a repeated layer (``h.3``, ``model.layers.12``);
    else the first numbered child of a container (``body.4`` in an ``nn.Sequential``); else the
    top-level child module (``fc1``, ``bn1``). None: no module (an op of the root's own forward).

    Without the two fallbacks a model with no ``layers.N`` path was one layer, so the least-saving
    plan recomputed its whole forward at the start of the backward and reached no lower peak than
    saving everything (a 4-block Sequential MLP: 3.27 MiB both ways, "no plan fits" at 0.7x)."""
    # a backward op AOTAutograd moved into the forward (GELU's derivative, tangent-free) has no module
    # stack of its own, only its forward op's; without it, it was a layer apart, so recomputing it meant
    # saving its [tokens, 4d] input: a 4-layer GPT's least-saving plan peaked at 29.10 MiB, not 2x0.5 MiB less
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack")
    if not stack:
        return None
    paths = [re.sub(r"\[['\"]?(\w+)['\"]?\]", r".\1", str(path)) for path, _type in stack.values()]
    for pattern in (_REPEATED, _NUMBERED):
        for p in paths:
            m = pattern.search(p)
            if m:
                return p[: m.end()]
    top = [p for p in paths if p and p not in ("L.self", "self", "L['self']")]
    return min(top, key=len) if top else None


def _tag(node: torch.fx.Node):
    return node.meta.get("recompute")


def _leaves_region(node: torch.fx.Node, bw_side) -> bool:
    """Whether a value tagged for recompute by a user ``torch.utils.checkpoint`` region is also read
    by forward ops outside that region (the region's output).

    Eager autograd keeps such an output alive: the next op saves it as its own input. Forbidding its
    save made every op after the region that was recomputed replay the whole region first, so a
    6-block MLP with every other block checkpointed could reach no lower than 8.27 MiB where its
    twin without the regions planned to 6.27 MiB. PyTorch's partitioner saves region boundaries the
    same way (``cleanup_recompute_tags`` in torch/_functorch/partitioners.py)."""
    region = node.meta.get("ac_graph_id")
    for user in node.users:
        if user in bw_side or user.op != "call_function":
            continue
        if _tag(user) is None or user.meta.get("ac_graph_id") != region:
            return True
    return False


def _limits(forced_save, forced_recompute, bw_side) -> tuple[str, ...]:
    """What the program may not choose, in words for the error and the notes: values that must be
    saved (random ops: replaying one would draw a new mask; user must-save tags) and values a user
    ``torch.utils.checkpoint`` region recomputes as asked. Only values the backward reads count."""
    out = []
    read = lambda c: any(u in bw_side for u in c.users)  # noqa: E731
    for kind, words in (("random", "random ops' values (dropout masks) are saved, never replayed"),
                        ("tagged", "values tagged must-save are saved")):
        vals = [c for c, k in forced_save if k == kind and read(c) and isinstance(c.meta.get("val"), torch.Tensor)]
        if vals:
            total = sum(tensor_bytes(c.meta["val"]) for c in vals)
            out.append(f"{words}: {len(vals)} values, {format_bytes(total)}")
    regions = {c.meta.get("ac_graph_id") for c in forced_recompute}
    if forced_recompute:
        out.append(
            f"{len(forced_recompute)} values inside {len(regions)} user torch.utils.checkpoint region(s) are recomputed "
            "as the user asked, never saved"
        )
    return tuple(out)


class Problem:
    """The 0-1 program of one joint graph (built once; solved for several limits ``B``)."""

    def __init__(self, joint: torch.fx.GraphModule, num_fwd_outputs: int, profile: DeviceProfile):
        from torch._functorch import partitioners as P
        from torch.utils.checkpoint import CheckpointPolicy

        info = P.classify_nodes(joint, [], num_fwd_outputs)
        bw_side = set(info.tangents_closure)
        out = next(n for n in joint.graph.nodes if n.op == "output")
        fw_outputs = set(a for a in out.args[0][:num_fwd_outputs] if isinstance(a, torch.fx.Node))
        bw_outputs = [a for a in out.args[0][num_fwd_outputs:] if isinstance(a, torch.fx.Node)]
        self.cands = [
            n for n in joint.graph.nodes if n.op == "call_function" and n not in bw_side and "val" in n.meta
        ]
        idx = {n: i for i, n in enumerate(self.cands)}
        self.idx = idx
        n = len(self.cands)
        self.size = np.zeros(n)
        self.cost = np.zeros(n)
        s_lo, s_hi = np.zeros(n), np.ones(n)
        r_lo, r_hi = np.zeros(n), np.ones(n)
        save_tags = (CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_SAVE)
        forced_save, forced_recompute = [], []
        recompute_tags = (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE)
        for i, c in enumerate(self.cands):
            val = c.meta["val"]
            tensor = isinstance(val, torch.Tensor)
            view = c.target is not operator.getitem and is_view(c)
            if not tensor or view:
                s_hi[i] = 0  # save the base (or the getitems of a multi-output op), not this
            else:
                self.size[i] = 0 if c in fw_outputs else tensor_bytes(val)
            if c.target is operator.getitem or view:
                self.cost[i] = 0.0
            else:
                self.cost[i] = node_time(c, profile)
            random = is_random(c) or (
                c.target is operator.getitem and isinstance(c.args[0], torch.fx.Node) and is_random(c.args[0])
            )
            if random or _tag(c) in save_tags:
                r_hi[i] = 0  # random values (and dropout's mask and output) are saved, never replayed
                forced_save.append((c, "random" if random else "tagged"))
            elif _tag(c) in recompute_tags and not _leaves_region(c, bw_side):
                s_hi[i] = 0  # inside a user checkpoint region
                forced_recompute.append(c)
        self.limits = _limits(forced_save, forced_recompute, bw_side)
        dd = data_dependent(joint)
        if dd:
            self.limits += (
                f"{len(dd)} values have data-dependent sizes (such as nonzero()'s), counted at the upper bounds the "
                "shape environment proves for them",
            )
        self.lo = np.concatenate([s_lo, r_lo])
        self.hi = np.concatenate([s_hi, r_hi])

        rows, cols, vals, lb = [], [], [], []
        r = 0

        self.rows: list[tuple] = []
        """What each row of ``A`` says, by candidate index: ("needed", a), ("closure", k, j) (j reads k) or
        ("boundary", k, b, j) (j reads k, whose base b is in another layer): what :mod:`memfit.planner.layers`
        splits by layer."""

        def add(terms, lower, what):
            nonlocal r
            for col, v in terms:
                rows.append(r)
                cols.append(col)
                vals.append(v)
            lb.append(lower)
            self.rows.append(what)
            r += 1

        needed = {a for u in bw_side for a in u.all_input_nodes if a in idx}
        needed |= {a for a in bw_outputs if a in idx}
        # rows in graph order, not set order: HiGHS breaks ties by row order, and two FSDP ranks once
        # chose different plans of equal peak for the identical graph
        for a in sorted(needed, key=idx.__getitem__):
            add([(idx[a], 1), (n + idx[a], 1)], 1, ("needed", idx[a]))  # s + r >= 1
        layer = {c: _layer_of(c) for c in self.cands}
        self.layer_keys = [layer[c] for c in self.cands]
        for c in self.cands:
            j = idx[c]
            for a in c.all_input_nodes:
                if a not in idx:
                    continue
                k = idx[a]
                add([(k, 1), (n + k, 1), (n + j, -1)], 0, ("closure", k, j))  # s_k + r_k >= r_j
                base = self._base(a)
                if layer[a] != layer[c] and base is not None:
                    # s_base >= r_j across a layer boundary
                    add([(idx[base], 1), (n + j, -1)], 0, ("boundary", k, idx[base], j))
        self.A = coo_matrix((vals, (rows, cols)), shape=(r, 2 * n)).tocsr()
        self.lb = np.array(lb, dtype=float)
        self.needed = needed
        self.n = n
        self._layers = None

    @property
    def layers(self):
        """The split of this program by layer (:class:`memfit.planner.layers.Layers`), built on first use;
        its ``reason`` says why it does not apply (then every probe solves the whole program)."""
        if self._layers is None:
            from memfit.planner.layers import Layers

            try:
                self._layers = Layers(self)
            except Exception as e:  # a graph the split did not foresee: the whole program, as before
                self._layers = Layers.refused(self, f"splitting by layer failed: {type(e).__name__}: {e}")
        return self._layers

    def legal(self, x: np.ndarray, limit: float | None) -> bool:
        """Whether ``x`` (``s`` then ``r``, 0-1) satisfies every row, bound and the byte limit."""
        ok = np.all(np.isin(x, (0.0, 1.0))) and np.all(x >= self.lo) and np.all(x <= self.hi)
        ok = ok and np.all(self.A @ x >= self.lb - 1e-9)
        return bool(ok and (limit is None or self.size @ x[: self.n] <= limit + 1e-6))

    def _base(self, a: torch.fx.Node) -> torch.fx.Node | None:
        """The savable value behind ``a``: itself, or the base of a chain of views (None: an input)."""
        while a in self.idx and a.target is not operator.getitem and is_view(a):
            nxt = next((x for x in a.all_input_nodes), None)
            if nxt is None:
                return None
            a = nxt
        if a not in self.idx:
            return None
        return a if self.hi[self.idx[a]] > 0 else None

    def solve(
        self, limit: float | None, *, minimise_bytes: bool = False, node_limits: tuple[int, ...] = NODE_LIMITS,
        safety_s: float = SAFETY_S, by_layer: bool | None = None,
    ) -> Probe | None:
        """The least-cost plan saving at most ``limit`` bytes (None: no plan saves so few).

        HiGHS stops after ``node_limits[0]`` branch-and-bound nodes with the best plan it has found (legal:
        what it could miss is recompute time, not memory, since the peak is evaluated on the plan itself),
        and tries the next, larger limit only when it found none. A node count, unlike a time limit, gives
        the same plan whatever the machine's load: with 0.25 s per probe the 32-layer Llama-3-8B graph gave
        +1%, +4% and +9% predicted time in three runs, and on Llama-2-7B (6160 variables) most probes
        stopped before the root LP was done, with 25-177 ms of recompute where the root node's plan costs
        0.19-0.77 ms (or with no plan, then 20 s more). At one node the same probes took 0.5-1.1 s and came
        within HiGHS's reported gap of 0.0-0.2% of optimal; proving optimality took up to 30 s (21,136
        nodes) for the same plan. ``safety_s`` bounds a pathological solve; a probe stopped by it (never
        seen here) is the only one whose plan could depend on the load.

        Where layers of one structure repeat (``by_layer``, default ``BY_LAYER``), the probe solves the
        *step* of :mod:`memfit.planner.layers` instead: each distinct layer's frontier, computed once per
        program, and one frontier point per layer, under the same node limits (the probe's
        ``layer_points`` says which). Exact, and checked against this program's rows; on an 8-block GPT
        178 variables instead of 810 and the same recompute time as this program solved to optimality
        (0.55% less at one limit), but not faster: 10 probes 2.5 s against 0.3 s, the step's multiple-choice
        rows being harder for HiGHS than this program's nearly integral LP (figures in that module). Where
        the split does not apply (``self.layers.reason``: Llama blocks, whose frontiers have hundreds of
        points) or finds no plan, the whole program is solved."""
        if (BY_LAYER if by_layer is None else by_layer) and self.layers.reason is None:
            split = self.layers
            for nodes in node_limits:
                x, res, chosen = split.solve(limit, minimise_bytes, nodes, safety_s)
                if x is not None or res.status not in (1, 4):
                    break
            if x is not None and self.legal(x, limit):
                p = self._probe(limit, x)
                p.layer_points = chosen
                return p
            if x is not None:  # never seen: refuse the split for good, solve the whole program
                split.reason = f"the plan assembled from the layers' frontiers broke a row of the program at {limit}"
            # no plan from the frontiers: the whole program says whether there is one
        for nodes in node_limits:
            res = self._milp(limit, minimise_bytes, nodes, safety_s)
            if res.x is not None or res.status not in (1, 4):  # 1: time or iteration limit; 4: node limit
                break
        if res.x is None:
            return None
        return self._probe(limit, res.x)

    def _milp(self, limit, minimise_bytes, nodes, seconds):
        n = self.n
        eps = 1e-15
        if minimise_bytes:
            c = np.concatenate([self.size, self.cost * 1e-6 / max(self.cost.sum(), 1e-12)])
        else:
            c = np.concatenate([self.size * eps, self.cost])
        cons = [LinearConstraint(self.A, self.lb, np.inf)]
        if limit is not None:
            row = np.concatenate([self.size, np.zeros(n)])
            cons.append(LinearConstraint(row[None, :], -np.inf, limit))
        options = {"time_limit": seconds, "disp": False}
        if nodes is not None:
            options["node_limit"] = nodes
        return milp(
            c,
            constraints=cons,
            integrality=np.ones(2 * n),
            bounds=Bounds(self.lo, self.hi),
            options=options,
        )

    def _probe(self, limit, x) -> Probe:
        n = self.n
        x = np.round(x).astype(bool)
        s, r = x[:n], x[n:]
        saved = frozenset(self.cands[i].name for i in range(n) if s[i])
        recomputed = frozenset(self.cands[i].name for i in range(n) if r[i] and not s[i])
        return Probe(
            limit if limit is not None else float("inf"),
            saved,
            recomputed,
            float(self.cost[r & ~s].sum()),
            int(self.size[s].sum()),
        )


def plan(
    joint: torch.fx.GraphModule,
    *,
    num_fwd_outputs: int,
    budget: int,
    profile: DeviceProfile,
    evaluate: Callable[[frozenset[str]], tuple[int, object]],
    max_probes: int = 10,
    curve_points: int = 0,
    progress: Callable[[str], None] | None = None,
    quick_refusal: bool = False,
) -> tuple[CheckpointPlan, object]:
    """The plan of least recompute time whose evaluated peak is at most ``budget``.

    ``evaluate(saved)`` carries a plan out and returns ``(peak_bytes, result)``; the result of the
    chosen plan is returned beside it (the partitioned graphs, so they are not built twice).
    ``curve_points``: probe at least this many saved-byte limits in all, evenly between the least
    and the most saving plans, so the report's budget-vs-time curve has points across the range.
    Raises :class:`Infeasible` with the smallest peak found when no plan fits; ``quick_refusal``: as soon
    as the least-saving plan is over the budget, without evaluating the fastest one (a stream search's
    probe needs only the verdict: the fastest plan of the Llama-3-8B config, 1.1 s of a probe, only
    ever confirmed it).

    The search: the least-saving and the fastest plans first (the two ends of the range); when the
    fastest does not fit, bisection on the saved-bytes limit between them (:func:`_bisect`); then
    the extra points of the curve (:func:`_fill_curve`).
    """
    t0 = time.perf_counter()
    problem = Problem(joint, num_fwd_outputs, profile)
    search = _Search(problem, evaluate, progress, max(max_probes, curve_points))
    lo = search.run(None, minimise_bytes=True)
    if lo is None:
        from memfit.errors import CantApply

        raise CantApply("the checkpoint program has no solution (conflicting save/recompute tags?)")
    if quick_refusal and lo.peak > budget and not curve_points:
        raise Infeasible(lo.peak, budget, _checkpoint_plan(lo, budget, search.probes, t0), lo.result, problem.limits)
    hi = search.run(None)  # no limit: the fastest plan (saves everything it needs)
    best = min((p for p in (lo, hi) if p.peak <= budget), key=lambda p: p.cost, default=None)
    if best is None and lo.peak > budget:
        low = min(search.probes, key=lambda p: p.peak)
        raise Infeasible(low.peak, budget, _checkpoint_plan(low, budget, search.probes, t0), low.result, problem.limits)
    if hi.peak > budget:
        best = _bisect(search, lo, hi, budget, best, max_probes)
    best = _fill_curve(search, lo, hi, budget, best, curve_points)
    assert best is not None
    return _checkpoint_plan(best, budget, search.probes, t0), best.result


class _Search:
    """The probes of one search: each limit is solved, and each plan not seen before carried out and
    evaluated once (in the order solved)."""

    def __init__(self, prob: Problem, evaluate, progress, shown_total: int):
        self.prob = prob
        self.evaluate = evaluate
        self.progress = progress
        self.shown_total = shown_total
        """The number of probes the progress lines count towards."""
        self.probes: list[Probe] = []
        self.seen: dict[frozenset[str], Probe] = {}
        self.solves = 0

    def run(self, limit, **kw) -> Probe | None:
        self.solves += 1
        p = self.prob.solve(limit, **kw)
        if p is None:
            return None
        if p.saved in self.seen:
            # a limit between two probes often gives one of their plans again: its peak is known,
            # and carrying it out again (0.1-0.4 s on an 8-layer GPT) would tell nothing new
            return self.seen[p.saved]
        p.peak, p.result = self.evaluate(p.saved)
        self.probes.append(p)
        self.seen[p.saved] = p
        if self.progress:
            # the peak and what it costs (the sum of saved bytes the program bounds counts values that
            # never live at once: "saving 523.08 MiB -> peak 138.60 MiB" on a 103 MiB step puzzled)
            self.progress(
                f"checkpoint plan {len(self.probes)}/{self.shown_total}: predicted peak {format_bytes(p.peak)}, "
                f"{len(p.recomputed)} values recomputed (+{1e3 * p.cost:.2f} ms)"
            )
        return p


def _bisect(search: _Search, lo: Probe, hi: Probe, budget: int, best: Probe | None, max_probes: int) -> Probe | None:
    """The fastest fitting plan found by halving the saved-bytes limit between ``a`` (fits) and ``b``
    (does not) until 1% apart, or until the fitting plan is within 1% of the budget. (Interpolating
    the peak between the two, tried on an 8-layer GPT, took as many probes: the peak moves in steps
    of a layer's tensors.)"""
    a, b = float(lo.saved_bytes), float(hi.saved_bytes)
    while len(search.probes) < max_probes and search.solves < 3 * max_probes and b - a > max(1.0, 0.01 * b):
        if best is not None and best.peak >= 0.99 * budget:
            break  # a finer limit moves the peak by less than the model's error
        mid = (a + b) / 2
        p = search.run(mid)
        if p is None:
            a = mid
            continue
        if p.peak <= budget:
            a = mid
            if best is None or p.cost < best.cost:
                best = p
        else:
            b = mid
    return best


def _fill_curve(search: _Search, lo: Probe, hi: Probe, budget: int, best: Probe | None, curve_points: int) -> Probe | None:
    """Probe evenly spaced limits until ``curve_points`` plans in all were evaluated (skipping limits
    within 1% of one already probed), keeping the fastest fitting plan: the report's curve then has
    points across the whole range, and a point that is faster and fits is chosen."""
    missing = curve_points - len(search.probes)
    for i in range(max(0, missing)):
        limit = lo.saved_bytes + (hi.saved_bytes - lo.saved_bytes) * (i + 1) / (missing + 1)
        if any(abs(p.limit - limit) < 0.01 * max(hi.saved_bytes, 1) for p in search.probes):
            continue
        p = search.run(limit)
        if p is not None and p.peak <= budget and (best is None or p.cost < best.cost):
            best = p
    return best


def _checkpoint_plan(p: Probe, budget: int, probes: list[Probe], t0: float) -> CheckpointPlan:
    """The plan of probe ``p``, with the search's count, time so far and frontier (every probe's
    simulated peak and recompute time)."""
    return CheckpointPlan(
        saved=p.saved,
        recomputed=p.recomputed,
        budget=budget,
        predicted_peak=p.peak,
        recompute_time_s=p.cost,
        saved_bytes=p.saved_bytes,
        probes=len(probes),
        plan_time_s=time.perf_counter() - t0,
        frontier=tuple(sorted({(q.peak, q.cost) for q in probes})),
    )
