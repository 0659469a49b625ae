"""Repeated layers planned once: the checkpoint program split by layer, each distinct layer solved alone.

The locality rule of :mod:`memfit.planner.checkpoint` (a recompute chain never crosses a layer
boundary: across one the input is saved) leaves the program's layers coupled only by the budget row
and by the rows of the edges that cross a boundary. So the program splits:

* a *layer* (the values of one ``_layer_of`` key) becomes a sub-program of its own values and of
  the rows among them, plus two kinds of 0-1 *flags* for its crossing edges: a consumer flag ``f``
  (``r_j <= f`` for the layer's values ``j`` that read a value ``k`` of another layer: ``f = 1``
  lets them be recomputed) and a producer flag ``g`` (``s_k + r_k >= g`` and ``s_base(k) >= g``
  for a value ``k`` read from outside the layer: ``g = 1`` is the promise the readers need). The
  crossing rows themselves become ``g >= f`` between the two layers. This is exact: from any legal
  plan of the whole program, ``f = max r_j`` and ``g = f`` give a legal split plan of the same
  bytes and time, and back;
* the *signature* of a layer is its sub-program written by positions (each value's op, shape,
  dtype, bytes, time and bounds; the rows and flags in positions inside the layer; an argument from
  outside the layer as the kind of node it is). Two layers of one signature have the same
  sub-program up to renaming, by construction, so one solve stands for both; a layer whose
  signature no other layer has stays in the whole program (the "outside": embeddings, the head,
  a last layer that feeds the head differently);
* for each distinct signature and each setting of its flags, the sub-program's exact Pareto frontier
  of (saved bytes, recompute time) is computed once (:meth:`Layers._pareto`: the least time under a
  byte limit, fewest bytes at that time, the limit then set just below the point found);
* a probe at limit ``B`` then solves only the *step*: one frontier point per layer (a multiple-choice
  knapsack over the points, whose flags enter the crossing rows), with the outside's values as
  variables of their own, under the one budget row (:meth:`Layers.solve`).

The split is exact: a layer's part of an optimal plan can be swapped for the frontier point of its
flags that saves no more and costs no more, so the step's optimum is the whole program's, and what
a probe gives up is only what HiGHS's node limit gives up, as on the whole program. Every plan
assembled is checked against the whole program's rows before it is returned; one that failed (never
seen) would be refused and the whole program solved instead.

Where it does not apply, ``Layers.reason`` says why and every probe solves the whole program: no two
layers of one structure; a layer with more than ``MAX_FLAGS`` crossing values; a view in one layer
of a value in another; a frontier of more than ``FRONTIER_POINTS`` points for one flag setting. The
last is every Llama block: RMSNorm's [tokens, 1] statistics (a few KiB) combine with every other
choice into hundreds of Pareto points (124-351 per setting on the 4-layer example Llama, 94 s to
compute). Coarsened to 24 points per setting, Llama-3-8B's step had 4,826 variables against the
whole program's 6,938, its 10 probes took 19.1 s against 13.4 s, and at the same limits its plans
cost +0.2% to +0.7% recompute time at five, +20% at one, and 0.78 ms where the whole program found
0 at two: so the split is refused there rather than coarsened (finding out costs 0.5 s on the
4-layer example Llama, and 1.5 s, 45 solves, on Llama-3-8B).

Measured (2 CPU cores; the program built from the joint graph on fake tensors as in
tests/test_checkpoint.py; 10 probes as the search makes them: the two ends, then 8 limits across
the range, default node limits):

* 8-block GPT (examples/gpt.py, batch 2 x 64 tokens, 64 wide): the whole program has 810 variables;
  the split has one class of 8 blocks (48 values each, embeddings and head outside), a frontier of 17
  points from 56 solves (0.65 s) and a step of 178 variables. The same 56 solves for 2, 4 or 8 blocks.
  At 7 limits across the range the plans cost what the whole program solved to optimality costs, and
  0.55% less at one (that "optimal" solve stops at HiGHS's absolute gap, 1e-6 s, on an objective
  in seconds). Not faster: the whole program solves in 0.02-0.05 s a probe, the step in 0.01-0.9 s
  (HiGHS's root node on the multiple-choice rows), 10 probes 2.5 s against 0.3 s;
* 32-block GPT (256 wide, batch 2 x 256 tokens): 3,114 variables whole, a step of 650 and a frontier
  of 19 points from 52 solves; the same recompute time at 8 limits; 10 probes 3.9 s against 1.3 s.

So what the split buys is the structure (one plan per distinct layer, repeated; a step program a
fifth to a quarter of the whole's size), not time on these graphs: the whole program's LP is nearly
integral, HiGHS solves it at the root, and the step's multiple-choice rows are harder for it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

#: Flags (consumer + producer) a layer may have; 2**MAX_FLAGS frontiers per distinct layer are computed.
MAX_FLAGS = 6
#: Points of one flag setting's frontier at most; a layer with more is not split (see :meth:`Layers._pareto`).
FRONTIER_POINTS = 32
#: Branch-and-bound nodes for each frontier solve (each layer's program is small: 96 variables for a
#: GPT block; the limit, not a time, keeps a solve's result independent of the machine's load).
FRONTIER_NODES = 10_000
#: Seconds after which a frontier solve stops (a guard, as ``SAFETY_S`` for the whole program's).
FRONTIER_SAFETY_S = 60.0


@dataclass(frozen=True)
class Layer:
    """One layer's sub-program, by positions inside the layer (``values[i]`` is position i)."""

    key: str
    values: tuple[int, ...]
    """The candidate indices of its values, in graph order."""
    rows: tuple[tuple, ...]
    """Its own rows: ("needed", i), ("closure", i, j), ("boundary", i, b, j), in positions."""
    consumers: tuple[tuple[int, ...], ...]
    """Per consumer flag: the positions of the values it bounds (``r_j <= f``)."""
    reads: tuple[tuple[int, ...], ...]
    """Per consumer flag: the candidate indices outside the layer it stands for."""
    producers: tuple[tuple[int, int | None], ...]
    """Per producer flag: (position of k, position of k's base, or None when no boundary row reads it)."""
    signature: tuple


@dataclass(frozen=True)
class Point:
    """One point of a layer class's frontier: its flags, saved bytes, recompute time, decision."""

    f: tuple[int, ...]
    g: tuple[int, ...]
    saved_bytes: float
    cost: float
    x: tuple[bool, ...]
    """``s`` then ``r`` of the layer's values, by position."""


def _encode(a, pos) -> object:
    if isinstance(a, torch.fx.Node):
        if a in pos:
            return ("in", pos[a])
        return ("outside", a.op)
    if isinstance(a, (list, tuple)):
        return tuple(_encode(b, pos) for b in a)
    if isinstance(a, dict):
        return tuple(sorted((k, _encode(v, pos)) for k, v in a.items()))
    return repr(a)


def _layer(prob, key: str, values: list[int]) -> Layer | str:
    """The sub-program of one layer, or why it cannot be split off (a string)."""
    pos = {v: i for i, v in enumerate(values)}
    nodes = {prob.cands[v]: i for i, v in enumerate(values)}
    n = prob.n
    desc = []
    for v in values:
        c = prob.cands[v]
        val = c.meta.get("val")
        tensor = isinstance(val, torch.Tensor)
        shape = (tuple(val.shape), str(val.dtype), tuple(val.stride())) if tensor else repr(type(val))
        target = c.target.__name__ if c.target is operator.getitem else str(c.target)
        desc.append((
            target, shape, _encode(c.args, nodes), _encode(c.kwargs, nodes),
            float(prob.size[v]), float(prob.cost[v]),
            float(prob.lo[v]), float(prob.hi[v]), float(prob.lo[n + v]), float(prob.hi[n + v]),
        ))
    rows, crossing_reads, produced = [], {}, {}
    for what in prob.rows:
        kind, *ix = what
        inside = [i in pos for i in ix]
        if all(inside):
            rows.append((kind, *(pos[i] for i in ix)))
            continue
        if kind == "needed" or not any(inside):
            continue
        k, j = ix[0], ix[-1]
        if kind == "boundary" and (ix[1] in pos) != (k in pos):
            return f"{key}: a value read across the layer's boundary is a view of a value in another layer"
        if j in pos:  # this layer reads k from outside
            crossing_reads.setdefault(k, set()).add(pos[j])
        else:  # outside reads this layer's k
            produced.setdefault(pos[k], None)
            if kind == "boundary":
                produced[pos[k]] = pos[ix[1]]
    # one consumer flag per set of readers: flags over the same values would always be equal
    by_readers: dict[tuple[int, ...], list[int]] = {}
    for k in sorted(crossing_reads):
        by_readers.setdefault(tuple(sorted(crossing_reads[k])), []).append(k)
    consumers = tuple(sorted(by_readers))
    reads = tuple(tuple(by_readers[c]) for c in consumers)
    producers = tuple(sorted(produced.items()))
    if len(consumers) + len(producers) > MAX_FLAGS:
        return (
            f"{key}: {len(consumers)} values read from outside the layer and {len(producers)} read from it "
            f"({2 ** (len(consumers) + len(producers))} frontiers per layer; at most 2**{MAX_FLAGS} are computed)"
        )
    signature = (tuple(desc), tuple(sorted(rows)), consumers, producers)
    return Layer(key, tuple(values), tuple(rows), consumers, reads, producers, signature)


class Layers:
    """The split of one :class:`~memfit.planner.checkpoint.Problem` by layer (see the module docstring).

    ``reason`` is None when the split applies; otherwise it says why not, and :meth:`solve` must not
    be called."""

    def __init__(self, prob):
        self.prob = prob
        self.reason: str | None = None
        self.layers: list[Layer] = []
        self.classes: list[list[int]] = []
        """Indices into ``layers`` of each class of equal signature (two layers or more), in graph order."""
        self.frontiers: list[list[Point]] = []
        self.frontier_solves = 0
        self.incomplete = False
        self.too_many = False
        keys = prob.layer_keys
        groups: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            if k is not None:
                groups.setdefault(k, []).append(i)
        built = []
        for key, values in groups.items():
            lay = _layer(prob, key, values)
            if isinstance(lay, str):
                self.reason = lay
                return
            built.append(lay)
        by_sig: dict[tuple, list[Layer]] = {}
        for lay in built:
            by_sig.setdefault(lay.signature, []).append(lay)
        for members in by_sig.values():
            if len(members) >= 2:
                self.classes.append(list(range(len(self.layers), len(self.layers) + len(members))))
                self.layers.extend(members)
        if not self.classes:
            self.reason = f"no two of the graph's {len(built)} layers have the same structure"
            return
        self.owner = np.full(prob.n, -1)
        for li, lay in enumerate(self.layers):
            self.owner[list(lay.values)] = li
        self.outside = np.flatnonzero(self.owner < 0)
        for members in self.classes:
            self.frontiers.append(self._frontier(self.layers[members[0]]))
        self.cls_of = {li: ci for ci, members in enumerate(self.classes) for li in members}
        if self.too_many:
            self.reason = (
                f"a layer's frontier has more than {FRONTIER_POINTS} points for one setting of its flags (values of a "
                "few hundred bytes, such as RMSNorm's, combine with every other choice: hundreds of points on a Llama "
                "block, and at 24 points a setting the plans of Llama-3-8B lost up to 20% of recompute time, no faster)"
            )
        elif self.incomplete:
            self.reason = (
                f"a solve of a layer's frontier stopped at its time limit ({FRONTIER_SAFETY_S:.0f} s) or at its node "
                f"limit ({FRONTIER_NODES}) without a plan"
            )
        elif any(not f for f in self.frontiers):
            self.reason = "a layer's program has no solution on its own"

    @classmethod
    def refused(cls, prob, reason: str) -> "Layers":
        """A split that does not apply, for ``reason``."""
        out = cls.__new__(cls)
        out.prob, out.reason, out.layers, out.classes, out.frontiers = prob, reason, [], [], []
        out.frontier_solves, out.incomplete, out.too_many = 0, False, False
        return out

    # -- the distinct layers -------------------------------------------------------------------
    def _frontier(self, lay: Layer) -> list[Point]:
        """Every Pareto-optimal (bytes, time) point of the layer's program, for every setting of its
        flags, less the points another point beats on bytes, time and flags alike."""
        prob = self.prob
        m = len(lay.values)
        v = np.array(lay.values)
        size, cost = prob.size[v], prob.cost[v]
        lo = np.concatenate([prob.lo[v], prob.lo[prob.n + v]])
        hi0 = np.concatenate([prob.hi[v], prob.hi[prob.n + v]])
        base_rows = [(_row_terms(r, m), 1.0 if r[0] == "needed" else 0.0) for r in lay.rows]
        points: list[Point] = []
        nf, ng = len(lay.consumers), len(lay.producers)
        for fbits in range(2 ** nf):
            if self.too_many:
                break
            f = tuple((fbits >> q) & 1 for q in range(nf))
            hi = hi0.copy()
            for q, readers in enumerate(lay.consumers):
                if not f[q]:
                    hi[[m + j for j in readers]] = 0
            for gbits in range(2 ** ng):
                if self.too_many:
                    break
                g = tuple((gbits >> q) & 1 for q in range(ng))
                rows = list(base_rows)
                for q, (k, b) in enumerate(lay.producers):
                    if g[q]:
                        rows.append(([(k, 1.0), (m + k, 1.0)], 1.0))
                        if b is not None:
                            rows.append(([(b, 1.0)], 1.0))
                points += self._pareto(f, g, size, cost, lo, hi, rows, m)
        keep = []
        for p in points:
            if not any(q is not p and _beats(q, p) for q in points):
                keep.append(p)
        return keep

    def _pareto(self, f, g, size, cost, lo, hi, rows, m) -> list[Point]:
        """The exact frontier of one flag setting: the least time under a byte limit (the fewest bytes at
        that time), the limit lowered below each point found, from the fastest plan to the least saving.
        More than FRONTIER_POINTS points: the split is refused (``self.too_many``)."""
        A, lb = _matrix(rows, 2 * m)
        cons = [LinearConstraint(A, lb, np.inf)] if A is not None else []
        zeros = np.zeros(m)
        # objectives scaled to about 1e6, solved with no relative gap: HiGHS's absolute gap (1e-6) is 5-10%
        # of a layer's recompute time in seconds (20-120 us on the test GPTs), so unscaled "optimal" solves
        # stopped that far off; and a tie-break below the gap was not honoured: points saved LayerNorm's
        # 512-byte statistics for nothing, 2 KiB a block, and an 8-block GPT lost 1.8% at a tight limit
        t_scale = 1e6 / max(cost.sum(), 1e-30)
        b_scale = 1e6 / max(size.sum(), 1.0)
        bytes_row = np.concatenate([size, zeros])[None, :]
        fastest = np.concatenate([size * b_scale * 1e-6, cost * t_scale])
        out, limit = [], np.inf
        while len(out) <= FRONTIER_POINTS:
            res = self._milp(fastest, cons + [LinearConstraint(bytes_row, -np.inf, limit)], lo, hi)
            if res.x is None:
                return out
            x = np.round(res.x).astype(bool)
            out.append(Point(f, g, float(size @ x[:m]), float(cost @ x[m:]), tuple(bool(e) for e in x)))
            limit = out[-1].saved_bytes - 0.5  # sizes are whole bytes
        self.too_many = True
        return out

    def _milp(self, c, cons, lo, hi):
        self.frontier_solves += 1
        res = milp(
            c, constraints=cons, integrality=np.ones(len(c)), bounds=Bounds(lo, hi),
            options={"node_limit": FRONTIER_NODES, "time_limit": FRONTIER_SAFETY_S, "disp": False, "mip_rel_gap": 0.0},
        )
        if res.status == 1 or (res.x is None and res.status != 2):
            # stopped by the clock (its result would depend on the machine's load), or by the node limit
            # with no plan (a point the frontier misses): the split is refused, the whole program solved
            self.incomplete = True
        return res

    # -- the step ------------------------------------------------------------------------------
    @property
    def step_variables(self) -> int:
        """Variables of the step's program: the outside's ``s`` and ``r``, one per frontier point per layer."""
        return 2 * len(self.outside) + sum(len(self.frontiers[self.cls_of[li]]) for li in range(len(self.layers)))

    def solve(self, limit, minimise_bytes, nodes, seconds):
        """The step's program at limit ``limit``: (x of the whole program or None, scipy's result, the
        frontier point each layer chose: an index into its class's frontier)."""
        prob = self.prob
        n = prob.n
        out = self.outside
        no = len(out)
        col = {int(v): i for i, v in enumerate(out)}  # s of outside value v at col[v], r at no + col[v]
        y0, offset = [], 2 * no
        for li in range(len(self.layers)):
            y0.append(offset)
            offset += len(self.frontiers[self.cls_of[li]])
        nv = offset
        # objective scaled to about 1 (see _pareto): time in units of the whole forward's, bytes in units
        # of all values'; the other term breaks ties (fewer bytes at equal time, or the reverse)
        t_unit = 1.0 / max(prob.cost.sum(), 1e-30)
        b_unit = 1.0 / max(prob.size.sum(), 1.0)
        w_t, w_b = (1e-6 * t_unit, b_unit) if minimise_bytes else (t_unit, 1e-9 * b_unit)
        c = np.zeros(nv)
        size_row = np.zeros(nv)
        c[:no] = prob.size[out] * w_b
        c[no:2 * no] = prob.cost[out] * w_t
        size_row[:no] = prob.size[out]
        lo = np.zeros(nv)
        hi = np.ones(nv)
        lo[:no], lo[no:2 * no] = prob.lo[out], prob.lo[n + out]
        hi[:no], hi[no:2 * no] = prob.hi[out], prob.hi[n + out]
        for li in range(len(self.layers)):
            pts = self.frontiers[self.cls_of[li]]
            for p_i, p in enumerate(pts):
                c[y0[li] + p_i] = p.saved_bytes * w_b + p.cost * w_t
                size_row[y0[li] + p_i] = p.saved_bytes

        def s_or_r(v, r):
            return (no if r else 0) + col[v]

        def producer(k, b):
            """Terms that say k may be read by a recompute elsewhere (b: its base when a boundary row)."""
            li = self.owner[k]
            if li < 0:
                return [(s_or_r(b, False), 1.0)] if b is not None else [(s_or_r(k, False), 1.0), (s_or_r(k, True), 1.0)]
            lay = self.layers[li]
            local = lay.values.index(k)
            q = next(q for q, (kk, _) in enumerate(lay.producers) if kk == local)
            return [(y0[li] + p_i, 1.0) for p_i, p in enumerate(self.frontiers[self.cls_of[li]]) if p.g[q]]

        def consumer(k, j):
            li = self.owner[j]
            if li < 0:
                return [(s_or_r(j, True), 1.0)]
            lay = self.layers[li]
            q = next(q for q, ks in enumerate(lay.reads) if k in ks)
            return [(y0[li] + p_i, 1.0) for p_i, p in enumerate(self.frontiers[self.cls_of[li]]) if p.f[q]]

        rows: dict[tuple, tuple[float, float]] = {}  # terms -> (lower, upper); a dict drops repeated rows
        for kind, *ix in prob.rows:
            k, j = ix[0], ix[-1]
            if all(self.owner[i] < 0 for i in ix):  # the outside's own rows, as in the whole program
                if kind == "needed":
                    terms = [(s_or_r(k, False), 1.0), (s_or_r(k, True), 1.0)]
                elif kind == "closure":
                    terms = [(s_or_r(k, False), 1.0), (s_or_r(k, True), 1.0), (s_or_r(j, True), -1.0)]
                else:
                    terms = [(s_or_r(ix[1], False), 1.0), (s_or_r(j, True), -1.0)]
                rows[tuple(terms)] = (1.0 if kind == "needed" else 0.0, np.inf)
            elif kind != "needed" and self.owner[k] != self.owner[j]:  # a crossing edge: g >= f
                terms = producer(k, ix[1] if kind == "boundary" else None) + [(t, -v) for t, v in consumer(k, j)]
                rows[tuple(terms)] = (0.0, np.inf)
            # else: a row inside one layer, in its frontier
        for li in range(len(self.layers)):  # one point per layer
            rows[tuple((y0[li] + p_i, 1.0) for p_i in range(len(self.frontiers[self.cls_of[li]])))] = (1.0, 1.0)
        ri, ci, vi, lb, ub = [], [], [], [], []
        for r, (terms, (low, up)) in enumerate(rows.items()):
            for t, v in terms:
                ri.append(r)
                ci.append(t)
                vi.append(v)
            lb.append(low)
            ub.append(up)
        A = coo_matrix((vi, (ri, ci)), shape=(len(lb), nv)).tocsr()
        cons = [LinearConstraint(A, lb, ub)]
        if limit is not None:
            cons.append(LinearConstraint(size_row[None, :], -np.inf, limit))
        options = {"time_limit": seconds, "disp": False}
        if nodes is not None:
            options["node_limit"] = nodes
        res = milp(c, constraints=cons, integrality=np.ones(nv), bounds=Bounds(lo, hi), options=options)
        if res.x is None:
            return None, res, ()
        z = np.round(res.x)
        x = np.zeros(2 * n)
        x[out] = z[:no]
        x[n + out] = z[no:2 * no]
        chosen = []
        for li, lay in enumerate(self.layers):
            pts = self.frontiers[self.cls_of[li]]
            p_i = int(np.argmax(z[y0[li]:y0[li] + len(pts)]))
            chosen.append(p_i)
            xl = np.array(pts[p_i].x, dtype=float)
            m = len(lay.values)
            v = np.array(lay.values)
            x[v] = xl[:m]
            x[n + v] = xl[m:]
        return x, res, tuple(chosen)


def _row_terms(r: tuple, m: int) -> list[tuple[int, float]]:
    kind, *ix = r
    if kind == "needed":
        return [(ix[0], 1.0), (m + ix[0], 1.0)]
    if kind == "closure":
        return [(ix[0], 1.0), (m + ix[0], 1.0), (m + ix[1], -1.0)]
    return [(ix[1], 1.0), (m + ix[2], -1.0)]


def _matrix(rows, width):
    if not rows:
        return None, None
    ri, ci, vi, lb = [], [], [], []
    for r, (terms, low) in enumerate(rows):
        for t, v in terms:
            ri.append(r)
            ci.append(t)
            vi.append(v)
        lb.append(low)
    return coo_matrix((vi, (ri, ci)), shape=(len(lb), width)).tocsr(), np.array(lb)


def _beats(q: Point, p: Point) -> bool:
    """Whether ``q`` is as good as ``p`` for the step in every way (bytes, time, what its flags ask of
    the neighbours and promise them), and better or earlier in one."""
    if q.saved_bytes > p.saved_bytes or q.cost > p.cost:
        return False
    if any(a > b for a, b in zip(q.f, p.f)) or any(a < b for a, b in zip(q.g, p.g)):
        return False
    same = q.saved_bytes == p.saved_bytes and q.cost == p.cost and q.f == p.f and q.g == p.g
    return not same or (q.x < p.x)
