"""Pipeline schedule simulator: the published 1F1B, interleaved 1F1B, zero-bubble (ZB-H1, ZB-H2, ZB-V)
and controllable-memory (V-Half, V-Min) schedules, from per-stage F, B, W times, communication and memory.

Zero-bubble schedules split each stage's backward into B (input gradients, which the previous stage
waits for) and W (weight gradients, which wait for nothing) and use W to fill the bubbles that 1F1B
leaves. Which schedule is best depends on the times and on memory: a deferred W holds what B handed
to it, and the schedules with no bubble keep more microbatches in flight or split each rank's layers
into two chunks (twice the point-to-point traffic).

Every schedule here is a fixed per-rank order of operations, built by the published rule (see each
``_order_*``), run by one event-driven engine: an op starts when the op before it on its rank has
ended and its inputs have arrived. Dependencies: ``F(v, m) <- F(v-1, m)``; ``B(v, m) <- B(v+1, m)``
(the last virtual stage's ``B <- F``); ``W(v, m) <- B(v, m)``; a hop between ranks costs ``comm``
seconds and does not occupy either rank (the zero-bubble paper's model).

Bubble rate is the zero-bubble paper's: ``1 - m (T_F + T_B + T_W) / cost``, the ideal time over the
longest stage. The paper measures ``cost`` two ways (its authors' script, branch ``arxiv``,
``efficiency.py``): from each stage's first F (ZB-H2, ZB-V and the searched schedules: a step whose
optimizer does not wait for the others, so consecutive steps overlap) and from the common start (1F1B,
interleaved 1F1B, ZB-H1). :class:`ScheduleResult` gives both (``bubble_rate``, ``bubble_rate_synced``);
``step_time`` is the synchronised one, what a step under ``torch.distributed.pipelining`` takes.

With the paper's profiled times (its Table 9, and the ZB-V experiment's times) the simulator
reproduces its bubble-rate tables (Tables 5 and 8) within 0.001 for 1F1B, 1F1B-I, ZB-H1 and ZB-H2
(``tests/test_schedule.py`` holds every row). At equal times: 1F1B ``(p-1)/(m+p-1)``; ZB-H1 idles
``(p-1)(T_F+T_B-T_W)``, a third of 1F1B, at 1F1B's peak activation memory; ZB-H2 and ZB-V zero, at
``2p-1`` and ``p`` microbatches of memory; V-Half and V-Min ``(p+2)//2`` and ``(p+4)//3``.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from memfit.units import format_bytes

SCHEDULES = ("1F1B", "1F1B-I", "ZB-H1", "ZB-H2", "ZB-V", "V-Half", "V-Min")
"""The published schedules, each a fixed order. Not here: the zero-bubble paper's searched ZB-1p/ZB-2p
(a greedy rule of ours under the same memory limits came out 0.03-0.09 above their published bubble
rates, worse than the hand-made ZB-H1 at 1F1B's memory, so it was dropped)."""

V_SHAPED = ("ZB-V", "V-Half", "V-Min")
"""Two chunks per rank, rank r holding virtual stages r and 2p-1-r: F and B both start and end on rank 0."""


@dataclass(frozen=True)
class StageCosts:
    """One pipeline stage (rank), per microbatch: times in seconds and memory in bytes.

    ``mem_f``: what a microbatch's forward leaves alive until its backward; ``mem_w``: what B hands
    to W (held until W runs; freed at B when W is not split off); ``resident``: parameters, grads,
    optimizer state. A schedule that splits the rank's layers into chunks gives each chunk an equal
    share of the times and of ``mem_f``/``mem_w``."""

    f: float
    b: float
    w: float
    mem_f: int = 0
    mem_w: int = 0
    resident: int = 0


@dataclass(frozen=True)
class Op:
    kind: str  # "F", "B", "W", or "BW" (B and W together, as 1F1B runs them)
    stage: int  # virtual stage (ZB-V: 2 per rank; interleaved 1F1B: ``chunks`` per rank)
    mb: int


@dataclass(frozen=True)
class ScheduleResult:
    name: str
    step_time: float
    """Seconds from the first F to the last op of the whole pipeline (every rank starts together)."""
    stage_spans: tuple[float, ...]
    """Per rank: from its first F's start to its last op's end."""
    bubble_rate: float
    """``1 - m (T_F+T_B+T_W) / max(stage_spans)``: the zero-bubble paper's definition, each stage
    timed from its own first F (steps overlap: no optimizer barrier)."""
    bubble_rate_synced: float
    """``1 - m (T_F+T_B+T_W) / step_time``: every stage timed from the common start."""
    idle: tuple[float, ...]
    """Per rank: idle seconds inside its span."""
    peak_bytes: tuple[int, ...]
    """Per rank: resident + the most activation memory alive at once."""
    peak_activations: tuple[float, ...] = ()
    """Per rank: the most activation memory alive at once, in units of that rank's ``mem_f`` (the
    microbatches' worth a schedule holds: 1F1B ``p-r``)."""
    comm_hops: int = 0
    """Point-to-point transfers per step (activations forward plus gradients back)."""
    timeline: tuple[tuple[tuple[Op, float, float], ...], ...] = field(repr=False, default=())
    """Per rank: (op, start, end) in run order, for drawing."""

    @property
    def order(self) -> tuple[tuple[Op, ...], ...]:
        """Per rank, the ops in the order they ran."""
        return tuple(tuple(op for op, _, _ in rank) for rank in self.timeline)

    def fits(self, budget: int | None) -> bool:
        return budget is None or max(self.peak_bytes) <= budget

    def describe(self) -> str:
        return (
            f"{self.name:9s} step {self.step_time * 1e3:9.2f} ms  bubble {100 * self.bubble_rate_synced:5.1f}%  "
            f"peak/stage {' '.join(format_bytes(b) for b in self.peak_bytes)}"
        )


# ---------------------------------------------------------------------------------------------------
# placements: which rank runs a virtual stage


def _rank_loop(v: int, p: int) -> int:
    """Interleaved 1F1B: virtual stage v on rank v mod p (chunk v // p)."""
    return v % p


def _rank_v(v: int, p: int) -> int:
    """V shape: rank r holds virtual stages r and 2p-1-r."""
    return v if v < p else 2 * p - 1 - v


# ---------------------------------------------------------------------------------------------------
# the published orders


def _order_hand(p: int, m: int, c: int, fused: bool = False) -> list[list[Op]]:
    """1F1B (``c=1, fused``), ZB-H1 (``c=1``) and ZB-H2 (``c=2``), the zero-bubble paper's Section 2:
    stage r runs ``(p-1-r) c`` warm-up forwards, then for each microbatch i an F (while any remain),
    B of microbatch i, and a W of the oldest waiting microbatch once ``i >= r c``; the ``r c`` Ws it
    held back run at the end. Holding Ws back on the later stages is what lets B travel back at
    T_B per stage, and the held-back Ws fill the tail; ZB-H2's extra warm-up forwards fill the head."""
    orders = []
    for r in range(p):
        warm = min((p - 1 - r) * c, m)
        ops: list[Op] = [Op("F", r, i) for i in range(warm)]
        nxt, waiting = warm, []
        for i in range(m):
            if nxt < m:
                ops.append(Op("F", r, nxt))
                nxt += 1
            if fused:
                ops.append(Op("BW", r, i))
                continue
            ops.append(Op("B", r, i))
            waiting.append(i)
            if i >= r * c:
                ops.append(Op("W", r, waiting.pop(0)))
        ops += [Op("W", r, i) for i in waiting]
        orders.append(ops)
    return orders


def _order_interleaved(p: int, m: int, chunks: int) -> list[list[Op]]:
    """Interleaved 1F1B (Megatron-LM; Narayanan et al. 2021): each rank holds ``chunks`` model chunks,
    virtual stage ``chunk * p + r``. Forwards go through microbatches in groups of p per chunk, chunk 0
    first; backwards the same with the chunks reversed. Rank r warms up with ``2(p-1-r) + (chunks-1) p``
    forwards, then alternates one forward and one (fused) backward. Needs ``m`` a multiple of ``p``."""
    total = m * chunks

    def unit(k: int, backward: bool) -> tuple[int, int]:
        chunk = (k // p) % chunks
        if backward:
            chunk = chunks - 1 - chunk
        return chunk, (k // (p * chunks)) * p + k % p

    orders = []
    for r in range(p):
        warm = min(2 * (p - 1 - r) + (chunks - 1) * p, total)
        ops = []
        for k in range(warm):
            ch, mb = unit(k, False)
            ops.append(Op("F", ch * p + r, mb))
        for k in range(total - warm):
            ch, mb = unit(k + warm, False)
            ops.append(Op("F", ch * p + r, mb))
            ch, mb = unit(k, True)
            ops.append(Op("BW", ch * p + r, mb))
        for k in range(total - warm, total):
            ch, mb = unit(k, True)
            ops.append(Op("BW", ch * p + r, mb))
        orders.append(ops)
    return orders


def _order_from_slots(p: int, m: int, slots: dict[str, callable]) -> list[list[Op]]:
    """Per-rank orders from a building block (the controllable-memory paper's framework): one
    microbatch's F and B of both chunks at fixed slot offsets on each rank, repeated every 6 slots per
    microbatch; each W in the earliest free slot on its rank after its B. ``slots[kind](r)`` gives the
    offset on rank r of ``F0`` (chunk 0 forward), ``F1``, ``B1`` (chunk 1's backward, which comes first)
    and ``B0``.

    Then, as the paper does for the warm-up and cool-down, every op in slot order moves to the earliest
    free slot its inputs allow unless a forward moved earlier would raise the rank's peak (forwards
    counted until their W): the steady state is the block's, the ends are packed. Last, the cool-down's
    Bs move up once more with the Ws lifted out, and the Ws go back into the free slots (the second
    chunk's first), where that keeps every rank's peak: V-Half at p=8, m=24 from 0.138 to 0.111 (its
    authors' code: 0.106), p=4, m=12 from 0.111 to 0.077 (0.065)."""
    placed: dict[Op, int] = {}
    occupied: list[set[int]] = [set() for _ in range(p)]
    for k in range(m):
        for r in range(p):
            for kind, v in (("F0", r), ("F1", 2 * p - 1 - r), ("B1", 2 * p - 1 - r), ("B0", r)):
                t = slots[kind](r) + 6 * k
                if t in occupied[r]:
                    raise AssertionError(f"building block collides on rank {r} at slot {t}")
                occupied[r].add(t)
                placed[Op(kind[0], v, k)] = t
    for op, t in sorted(placed.items(), key=lambda x: x[1]):
        if op.kind == "B":
            r = _rank_v(op.stage, p)
            s = t + 1
            while s in occupied[r]:
                s += 1
            occupied[r].add(s)
            placed[Op("W", op.stage, op.mb)] = s
    horizon = max(placed.values()) + 2
    level = [[0] * horizon for _ in range(p)]  # forwards not yet freed by their W, per slot
    for op, t in placed.items():
        if op.kind in ("F", "W"):
            d = 1 if op.kind == "F" else -1
            row = level[_rank_v(op.stage, p)]
            for s in range(t, horizon):
                row[s] += d
    limit = _peak_in_flight(placed, p)

    def earliest(op: Op, at: dict[Op, int]) -> int:
        """The first slot ``op``'s input allows, under placement ``at``."""
        if op.kind == "W":
            return at[Op("B", op.stage, op.mb)] + 1
        if op.kind == "F":
            return at[Op("F", op.stage - 1, op.mb)] + 1 if op.stage else 0
        if op.stage == 2 * p - 1:
            return at[Op("F", op.stage, op.mb)] + 1
        return at[Op("B", op.stage + 1, op.mb)] + 1

    for op, t in sorted(placed.items(), key=lambda x: (x[1], x[0].stage)):
        r = _rank_v(op.stage, p)
        row = level[r]
        for s in range(earliest(op, placed), t):
            if s in occupied[r] or (op.kind == "F" and max(row[s:t]) + 1 > limit[r]):
                continue
            occupied[r].discard(t)
            occupied[r].add(s)
            placed[op] = s
            if op.kind != "B":
                d = 1 if op.kind == "F" else -1
                for u in range(s, t):
                    row[u] += d
            break
    # the cool-down once more without the Ws: each B as early as its input allows, then the Ws back into
    # the free slots after their B, the second chunk's first (its B came first), the rest at the end
    last_f = max(t for op, t in placed.items() if op.kind == "F")
    ws = {op: t for op, t in placed.items() if op.kind == "W"}
    fb = {op: t for op, t in placed.items() if op.kind != "W"}
    busy: list[set[int]] = [set() for _ in range(p)]
    for op, t in fb.items():
        busy[_rank_v(op.stage, p)].add(t)
    for op, t in sorted(fb.items(), key=lambda x: (x[1], x[0].stage)):
        if op.kind != "B" or t <= last_f:
            continue
        r = _rank_v(op.stage, p)
        for s in range(earliest(op, fb), t):
            if s not in busy[r]:
                busy[r].discard(t)
                busy[r].add(s)
                fb[op] = s
                break
    trial = dict(fb)
    for r in range(p):
        queue = sorted((w for w in ws if _rank_v(w.stage, p) == r),
                       key=lambda w: (w.stage < p, fb[Op("B", w.stage, w.mb)]))
        t = 0
        while queue:
            if t not in busy[r]:
                ready = [w for w in queue if fb[Op("B", w.stage, w.mb)] < t]
                if ready:
                    trial[ready[0]] = t
                    queue.remove(ready[0])
            t += 1
    if all(a <= b for a, b in zip(_peak_in_flight(trial, p), limit)):
        placed = trial
    out: list[list[tuple[int, Op]]] = [[] for _ in range(p)]
    for op, t in placed.items():
        out[_rank_v(op.stage, p)].append((t, op))
    return [[op for _, op in sorted(lst, key=lambda x: x[0])] for lst in out]


def _peak_in_flight(placed: dict[Op, int], p: int) -> list[int]:
    """Per rank, the most chunk-forwards not yet freed by their W at any slot."""
    events: list[list[tuple[int, int]]] = [[] for _ in range(p)]
    for op, t in placed.items():
        if op.kind in ("F", "W"):
            events[_rank_v(op.stage, p)].append((t, 1 if op.kind == "F" else -1))
    peaks = []
    for ev in events:
        level = best = 0
        for _, d in sorted(ev, key=lambda e: (e[0], e[1])):
            level += d
            best = max(best, level)
        peaks.append(best)
    return peaks


def _order_v_half(p: int, m: int) -> list[list[Op]]:
    """V-Half (Qi et al. 2024, "Pipeline Parallelism with Controllable Memory"): chunk 0's forward and
    chunk 1's backward step two slots a rank, the others one; the lifespan on a rank is about 6p slots
    against 1F1B's 12p, so it holds half 1F1B's activations, ``(p+2)//2`` microbatches."""
    g = 3 if p % 2 == 0 else 0
    return _order_from_slots(p, m, {
        "F0": lambda r: 2 * r,
        "F1": lambda r: 3 * p - 2 - r,
        "B1": lambda r: 3 * p + g + 2 * r - 1,
        "B0": lambda r: 6 * p + g - r - 2,
    })


def _order_v_min(p: int, m: int) -> list[list[Op]]:
    """V-Min (same paper): every hop one slot, the turn-arounds one slot (three at rank 0 when 3 divides
    p, to avoid a collision); lifespan about 4p slots: a third of 1F1B's activations, ``(p+4)//3``."""
    g = 2 if p % 3 == 0 else 0
    return _order_from_slots(p, m, {
        "F0": lambda r: r,
        "F1": lambda r: 2 * p - 1 - r,
        "B1": lambda r: 2 * p + g + r,
        "B0": lambda r: 4 * p + g - 1 - r,
    })


def _order_zb_v(p: int, m: int) -> list[list[Op]]:
    """ZB-V (the zero-bubble paper's Section 6): rank r holds chunk ``a`` = virtual stage r and chunk
    ``b`` = 2p-1-r. Warm-up: ``2(p-r)-1`` forwards of ``a``, then ``r`` pairs (F of ``b``, F of ``a``),
    then ``p-r`` groups (F, B, W) on ``b``; steady: groups on ``a`` and on ``b`` in turn until every
    forward ran; cool-down: ``r`` pairs (B of ``a``, B of ``b``), then ``p-r`` pairs (B, W) on ``a``, then
    the Ws left, ``b``'s first. 2p-1 forwards in flight at most (p microbatches: 1F1B's memory) and no
    bubble at equal times. Written for ``m >= 2p-1``; with fewer microbatches the rule runs on ``2p-1``
    and the ops of microbatches that do not exist are left out (as PyTorch's ``ScheduleZBVZeroBubble``)."""
    n = max(m, 2 * p - 1)
    orders = []
    for r in range(p):
        a, b = r, 2 * p - 1 - r
        cnt = {("F", a): 0, ("F", b): 0, ("B", a): 0, ("B", b): 0, ("W", a): 0, ("W", b): 0}
        ops: list[Op] = []

        def emit(kind: str, v: int) -> None:
            ops.append(Op(kind, v, cnt[(kind, v)]))
            cnt[(kind, v)] += 1

        for _ in range(2 * (p - r) - 1):
            emit("F", a)
        for _ in range(r):
            emit("F", b)
            emit("F", a)
        for _ in range(p - r):
            emit("F", b), emit("B", b), emit("W", b)
        while cnt[("F", b)] < cnt[("F", a)] or cnt[("F", a)] < n:
            if cnt[("F", a)] < n:
                emit("F", a)
            emit("B", a), emit("W", a)
            emit("F", b), emit("B", b), emit("W", b)
        for _ in range(r):
            emit("B", a), emit("B", b)
        for _ in range(p - r):
            emit("B", a), emit("W", a)
        while cnt[("W", b)] < cnt[("B", b)]:
            emit("W", b)
        while cnt[("W", a)] < cnt[("B", a)]:
            emit("W", a)
        orders.append([op for op in ops if op.mb < m])
    return orders


# ---------------------------------------------------------------------------------------------------
# the engine


class _Engine:
    """Event-driven run of one pipeline step from per-rank fixed orders."""

    def __init__(self, costs: list[StageCosts], m: int, n_virtual: int, comm: float, placement,
                 virtual_costs: list[StageCosts] | None = None):
        self.p, self.m, self.nv, self.comm = len(costs), m, n_virtual, comm
        self.rank = [placement(v, self.p) for v in range(n_virtual)]
        per_rank = [sum(1 for v in range(n_virtual) if self.rank[v] == r) for r in range(self.p)]
        if virtual_costs is not None:  # each virtual stage's own (measured) costs
            if len(virtual_costs) != n_virtual:
                raise ValueError(f"virtual_costs has {len(virtual_costs)} entries for {n_virtual} virtual stages")
            self.vc = [_chunk(c, 1) for c in virtual_costs]
        else:
            self.vc = [_chunk(costs[self.rank[v]], per_rank[self.rank[v]]) for v in range(n_virtual)]
        self.end: dict[Op, float] = {}
        self.rank_time = [0.0] * self.p
        self.first_f: list[float | None] = [None] * self.p
        self.busy = [0.0] * self.p
        self.mem = [0.0] * self.p
        self.peak = [0.0] * self.p
        self.timeline: list[list[tuple[Op, float, float]]] = [[] for _ in range(self.p)]
        self.hops = 0

    def dur(self, op: Op) -> float:
        c = self.vc[op.stage]
        return {"F": c[0], "B": c[1], "W": c[2], "BW": c[1] + c[2]}[op.kind]

    def deps(self, op: Op) -> list[tuple[Op, float]]:
        """(op, delay) pairs: what this op waits for, with the communication delay if cross-rank."""
        r = self.rank[op.stage]

        def hop(other: Op) -> tuple[Op, float]:
            return other, (self.comm if self.rank[other.stage] != r else 0.0)

        if op.kind == "F":
            return [hop(Op("F", op.stage - 1, op.mb))] if op.stage > 0 else []
        if op.kind in ("B", "BW"):
            if op.stage == self.nv - 1:
                return [(Op("F", op.stage, op.mb), 0.0)]
            nxt = Op("BW", op.stage + 1, op.mb)
            return [hop(nxt if nxt in self.end else Op("B", op.stage + 1, op.mb))]
        return [(Op("B", op.stage, op.mb), 0.0)]

    def run(self, r: int, op: Op, start: float, deps: list[tuple[Op, float]]) -> None:
        c = self.vc[op.stage]
        end = start + self.dur(op)
        self.end[op] = end
        self.rank_time[r] = end
        self.busy[r] += end - start
        if op.kind == "F" and self.first_f[r] is None:
            self.first_f[r] = start
        mem_f, mem_w = c[3], c[4]
        self.mem[r] += {"F": mem_f, "B": mem_w - mem_f, "W": -mem_w, "BW": -mem_f}[op.kind]
        self.peak[r] = max(self.peak[r], self.mem[r])
        if any(self.rank[d.stage] != r for d, _ in deps):
            self.hops += 1
        self.timeline[r].append((op, start, end))

    def fixed(self, orders: list[list[Op]]) -> None:
        """Run each rank's ops in its order, each as early as its inputs allow. Ranks are advanced in
        time order (a heap of (ready time, rank)), so the run costs O(ops log p)."""
        for r, ops in enumerate(orders):
            if any(self.rank[op.stage] != r for op in ops):
                raise ValueError(f"rank {r}'s order holds an op of a stage placed on another rank")
        pos = [0] * self.p
        waiting: dict[Op, list[int]] = {}  # an unmet dependency -> ranks blocked on it
        heap = [(0.0, r) for r in range(self.p) if orders[r]]
        heapq.heapify(heap)
        while heap:
            _, r = heapq.heappop(heap)
            op = orders[r][pos[r]]
            deps = self.deps(op)
            missing = next((d for d, _ in deps if d not in self.end), None)
            if missing is not None:
                waiting.setdefault(missing, []).append(r)
                continue
            start = max([self.rank_time[r]] + [self.end[d] + delay for d, delay in deps])
            self.run(r, op, start, deps)
            pos[r] += 1
            if pos[r] < len(orders[r]):
                heapq.heappush(heap, (self.rank_time[r], r))
            for key in (op, Op("B", op.stage, op.mb) if op.kind == "BW" else None):
                for w in waiting.pop(key, []) if key is not None else []:
                    heapq.heappush(heap, (self.rank_time[w], w))
        if any(pos[r] < len(orders[r]) for r in range(self.p)):
            stuck = {r: orders[r][pos[r]] for r in range(self.p) if pos[r] < len(orders[r])}
            raise RuntimeError(f"schedule order deadlocks: ranks wait for ops that never run ({stuck})")

    def result(self, name: str, costs: list[StageCosts]) -> ScheduleResult:
        spans, idle = [], []
        for r in range(self.p):
            span = self.rank_time[r] - (self.first_f[r] or 0.0)
            spans.append(span)
            idle.append(span - self.busy[r])
        work = max(self.m * sum(sum(self.vc[v][:3]) for v in range(self.nv) if self.rank[v] == r) for r in range(self.p))
        step = max(self.end.values()) if self.end else 0.0
        return ScheduleResult(
            name=name,
            step_time=step,
            stage_spans=tuple(spans),
            bubble_rate=1.0 - work / max(spans) if max(spans) > 0 else 0.0,
            bubble_rate_synced=1.0 - work / step if step > 0 else 0.0,
            idle=tuple(idle),
            peak_bytes=tuple(costs[r].resident + int(round(self.peak[r])) for r in range(self.p)),
            peak_activations=tuple(self.peak[r] / costs[r].mem_f if costs[r].mem_f else 0.0 for r in range(self.p)),
            comm_hops=self.hops,
            timeline=tuple(tuple(t) for t in self.timeline),
        )


def _chunk(c: StageCosts, n: int) -> tuple[float, float, float, float, float]:
    """A chunk's (f, b, w, mem_f, mem_w) when a rank's layers are cut into ``n`` equal chunks (memory
    kept fractional: rounding a chunk's bytes down would make one byte per microbatch hold nothing)."""
    return (c.f / n, c.b / n, c.w / n, c.mem_f / n, c.mem_w / n)


def orders_for(name: str, p: int, m: int, *, chunks: int = 2) -> tuple[list[list[Op]], int, object]:
    """(per-rank orders, number of virtual stages, placement) of a published schedule."""
    if name == "1F1B":
        return _order_hand(p, m, 1, fused=True), p, _rank_loop
    if name == "ZB-H1":
        return _order_hand(p, m, 1), p, _rank_loop
    if name == "ZB-H2":
        return _order_hand(p, m, 2), p, _rank_loop
    if name == "1F1B-I":
        if m % p:
            raise ValueError(f"interleaved 1F1B needs the microbatches ({m}) to be a multiple of the stages ({p})")
        return _order_interleaved(p, m, chunks), chunks * p, _rank_loop
    if name == "V-Half":
        return _order_v_half(p, m), 2 * p, _rank_v
    if name == "V-Min":
        return _order_v_min(p, m), 2 * p, _rank_v
    if name == "ZB-V":
        return _order_zb_v(p, m), 2 * p, _rank_v
    raise ValueError(f"unknown schedule {name!r}; accepted: {', '.join(SCHEDULES)}")


def simulate(name: str, costs: list[StageCosts], m: int, *, comm: float = 0.0, chunks: int = 2) -> ScheduleResult:
    """Simulate schedule ``name`` (one of :data:`SCHEDULES`) for ``m`` microbatches over ``len(costs)``
    ranks; ``comm`` seconds per hop between ranks; ``chunks``: model chunks per rank of interleaved 1F1B."""
    p = len(costs)
    if m < 1 or p < 1:
        raise ValueError(f"need at least one stage and one microbatch (got {p} stages, {m} microbatches)")
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; accepted: {', '.join(SCHEDULES)}")
    orders, nv, placement = orders_for(name, p, m, chunks=chunks)
    eng = _Engine(costs, m, nv, comm, placement)
    eng.fixed(orders)
    return eng.result(name, costs)


def simulate_orders(name: str, orders: list[list[Op]], costs: list[StageCosts], m: int, *,
                    comm: float = 0.0, v_shape: bool | None = None,
                    virtual_costs: list[StageCosts] | None = None) -> ScheduleResult:
    """Simulate given per-rank op orders (e.g. the ``pipeline_order`` of a ``torch.distributed.pipelining``
    schedule, see :func:`orders_from_pytorch`, or :func:`orders_for`). Virtual stages beyond ``len(costs)``
    are placed V-shaped (rank r: r and 2p-1-r) when ``v_shape`` (default: when rank 0 holds stage 2p-1),
    else round-robin. ``virtual_costs``: each virtual stage's own costs (measured ones differ: the last
    holds the head and the loss), instead of equal shares of its rank's."""
    p = len(costs)
    nv = 1 + max((op.stage for rank in orders for op in rank), default=0)
    if v_shape is None:
        v_shape = nv == 2 * p and any(op.stage == nv - 1 for op in orders[0])
    eng = _Engine(costs, m, nv, comm, _rank_v if v_shape else _rank_loop, virtual_costs)
    eng.fixed(orders)
    return eng.result(name, costs)


def orders_from_pytorch(pipeline_order: dict[int, list]) -> list[list[Op]]:
    """Per-rank :class:`Op` lists from a PyTorch schedule's ``pipeline_order`` (actions F, I, W, B;
    idle slots (None) and communication actions are dropped: the simulator adds the waits itself)."""
    kinds = {"F": "F", "I": "B", "W": "W", "B": "BW"}
    out = []
    for rank in sorted(pipeline_order):
        ops = []
        for a in pipeline_order[rank]:
            if a is None:
                continue
            kind = kinds.get(getattr(a.computation_type, "value", str(a.computation_type)))
            if kind is not None:
                ops.append(Op(kind, a.stage_index, a.microbatch_index))
        out.append(ops)
    return out


def choose(costs: list[StageCosts], m: int, *, budget: int | None = None, comm: float = 0.0,
           schedules: tuple[str, ...] = SCHEDULES) -> tuple[ScheduleResult | None, list[ScheduleResult]]:
    """Simulate each schedule; return the fastest whose every stage's peak fits ``budget`` (None if
    none does) and all the results, fastest first. Schedules whose shape does not apply (interleaved
    1F1B with ``m`` not a multiple of the stages) are left out."""
    results = []
    for s in schedules:
        try:
            results.append(simulate(s, costs, m, comm=comm))
        except ValueError:
            if s in SCHEDULES and s != "1F1B-I":
                raise
    results.sort(key=lambda r: (r.step_time, max(r.peak_bytes)))
    fitting = [r for r in results if r.fits(budget)]
    return (fitting[0] if fitting else None), results
