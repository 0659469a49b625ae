"""Pipeline schedule simulator: 1F1B, ZB-H1, ZB-H2 and ZB-V from per-stage F, B, W times.

Zero-bubble schedules split each stage's backward into B (input gradients, which the previous
stage waits for) and W (weight gradients, which wait for nothing) and use W to fill the bubbles
that 1F1B leaves. Which schedule is best depends on the times and on memory: W deferred holds the
values B handed to it, and the schedules with no bubble keep more microbatches in flight.

The simulator is event-driven. Dependencies: ``F(s, m) <- F(s-1, m)``; ``B(s, m) <- B(s+1, m)``
(the last stage's ``B <- F``); ``W(s, m) <- B(s, m)``; a hop between ranks costs ``comm`` seconds.
Each rank runs one op at a time. 1F1B and ZB-H1 follow their published orders; ZB-H2 and ZB-V are
made by a greedy rule (a ready B first, then an F if the memory limit allows, then a W) under the
schedule's memory limit, as the zero-bubble authors' own heuristic does.

Bubble rate is defined as in the zero-bubble paper: ``1 - m (T_F + T_B + T_W) / T_stage`` with
``T_stage`` the longest span of one stage from its first F's start to its last op's end. With
``T_F = T_B = T_W`` the simulator reproduces the published figures exactly: 1F1B
``(p-1)/(m+p-1)``; ZB-H1 idles ``(p-1)(T_F+T_B-T_W)`` per stage, a third of 1F1B's
``(p-1)(T_F+T_B+T_W)`` (so its bubble, over 1F1B's step, is a third of 1F1B's rate); ZB-H2 zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from memfit.units import format_bytes

SCHEDULES = ("1F1B", "ZB-H1", "ZB-H2", "ZB-V")


@dataclass(frozen=True)
class StageCosts:
    """One pipeline stage, per microbatch: times in seconds and memory in bytes.

    ``mem_f``: what a microbatch's forward leaves alive until its backward; ``mem_w``: what B hands
    to W (held until W runs; freed at B when W is not split off); ``resident``: parameters, grads,
    optimizer state."""

    f: float
    b: float
    w: float
    mem_f: int = 0
    mem_w: int = 0
    resident: int = 0


@dataclass(frozen=True)
class Op:
    kind: str  # "F", "B", "W", or "BW" (B and W together, 1F1B)
    stage: int  # virtual stage (ZB-V: 2 per rank)
    mb: int


@dataclass(frozen=True)
class ScheduleResult:
    name: str
    step_time: float
    """Seconds from the first F to the last op of the whole pipeline."""
    stage_spans: tuple[float, ...]
    """Per rank: from its first F's start to its last op's end."""
    bubble_rate: float
    """``1 - m (T_F+T_B+T_W) / max(stage_spans)`` (the zero-bubble paper's definition)."""
    idle: tuple[float, ...]
    """Per rank: idle seconds inside its span."""
    peak_bytes: tuple[int, ...]
    """Per rank: resident + the most activation memory alive at once."""
    order: tuple[tuple[Op, ...], ...] = field(repr=False, default=())
    """Per rank, the ops in the order they ran."""

    def fits(self, budget: int | None) -> bool:
        return budget is None or max(self.peak_bytes) <= budget

    def describe(self) -> str:
        return (
            f"{self.name:6s} step {self.step_time * 1e3:9.2f} ms  bubble {100 * self.bubble_rate:5.1f}%  "
            f"peak/stage {' '.join(format_bytes(b) for b in self.peak_bytes)}"
        )


def _costs_for(costs: list[StageCosts], n_virtual: int) -> list[StageCosts]:
    """Per virtual stage costs: ZB-V cuts each rank's layers in two chunks of half the cost each."""
    p = len(costs)
    if n_virtual == p:
        return list(costs)
    out = []
    for v in range(n_virtual):
        c = costs[v if v < p else 2 * p - 1 - v]
        out.append(StageCosts(c.f / 2, c.b / 2, c.w / 2, c.mem_f // 2, c.mem_w // 2, c.resident))
    return out


def _rank_of(v: int, p: int, n_virtual: int) -> int:
    return v if v < p else 2 * p - 1 - v


def _order_1f1b(p: int, m: int) -> list[list[Op]]:
    """1F1B's order per rank: ``p-1-s`` warm-up forwards, then one forward and one backward (B and W
    together) in turn, then the remaining backwards."""
    orders = []
    for s in range(p):
        warm = min(p - 1 - s, m)
        ops: list[Op] = [Op("F", s, i) for i in range(warm)]
        for i in range(m):
            if warm + i < m:
                ops.append(Op("F", s, warm + i))
            ops.append(Op("BW", s, i))
        orders.append(ops)
    return orders


class _Engine:
    """Event-driven simulation of one pipeline; ops either follow fixed per-rank orders or are chosen
    greedily at run time under per-rank memory limits."""

    def __init__(self, costs: list[StageCosts], p: int, m: int, n_virtual: int, comm: float):
        self.vc = _costs_for(costs, n_virtual)
        self.p, self.m, self.nv, self.comm = p, m, n_virtual, comm
        self.end: dict[Op, float] = {}
        self.rank_time = [0.0] * p
        self.first_f: list[float | None] = [None] * p
        self.busy = [0.0] * p
        self.mem = [0] * p
        self.in_flight_v = [0] * n_virtual  # forwards whose B has not run, per virtual stage
        self.peak = [0] * p
        self.order: list[list[Op]] = [[] for _ in range(p)]

    def dur(self, op: Op) -> float:
        c = self.vc[op.stage]
        return {"F": c.f, "B": c.b, "W": c.w, "BW": c.b + c.w}[op.kind]

    def deps(self, op: Op) -> list[tuple[Op, float]]:
        """(op, delay) pairs: the ops this one waits for, with the communication delay if cross-rank."""
        r = _rank_of(op.stage, self.p, self.nv)

        def hop(other: Op) -> tuple[Op, float]:
            return other, (self.comm if _rank_of(other.stage, self.p, self.nv) != r else 0.0)

        if op.kind == "F":
            return [hop(Op("F", op.stage - 1, op.mb))] if op.stage > 0 else []
        if op.kind in ("B", "BW"):
            if op.stage == self.nv - 1:
                return [(Op("F", op.stage, op.mb), 0.0)]
            nxt = [k for k in ("B", "BW") if Op(k, op.stage + 1, op.mb) in self.end]
            return [hop(Op(nxt[0] if nxt else "B", op.stage + 1, op.mb))]
        return [(Op("B", op.stage, op.mb), 0.0)]

    def ready_at(self, op: Op) -> float | None:
        t = 0.0
        for d, delay in self.deps(op):
            if d not in self.end:
                return None
            t = max(t, self.end[d] + delay)
        return t

    def run(self, rank: int, op: Op, start: float) -> None:
        c = self.vc[op.stage]
        d = self.dur(op)
        end = start + d
        self.end[op] = end
        self.rank_time[rank] = end
        self.busy[rank] += d
        delta = {"F": c.mem_f, "B": c.mem_w - c.mem_f, "W": -c.mem_w, "BW": -c.mem_f}[op.kind]
        if op.kind == "F" and self.first_f[rank] is None:
            self.first_f[rank] = start
        self.mem[rank] += delta
        self.in_flight_v[op.stage] += {"F": 1, "B": -1, "BW": -1, "W": 0}[op.kind]
        self.peak[rank] = max(self.peak[rank], self.mem[rank])
        self.order[rank].append(op)

    def fixed(self, orders: list[list[Op]]) -> None:
        pos = [0] * self.p
        remaining = sum(len(o) for o in orders)
        while remaining:
            progressed = False
            for r in range(self.p):
                while pos[r] < len(orders[r]):
                    op = orders[r][pos[r]]
                    t = self.ready_at(op)
                    if t is None:
                        break
                    self.run(r, op, max(t, self.rank_time[r]))
                    pos[r] += 1
                    remaining -= 1
                    progressed = True
            if not progressed:
                raise RuntimeError("schedule order deadlocks (an op waits for one that never runs)")

    def greedy(self, limits: list[int]) -> None:
        """Each rank, when free, runs a ready B (oldest first), else an F if its (virtual) stage has
        fewer than ``limits[v]`` microbatches in flight (forward done, B not yet), else a pending W;
        else it waits for the next op to finish anywhere. Per virtual stage: a ZB-V chunk has its
        own limit, so the first chunk's forwards cannot fill the rank and starve the second's."""
        p, m, nv = self.p, self.m, self.nv
        stages_of = [[v for v in range(nv) if _rank_of(v, p, nv) == r] for r in range(p)]
        next_f = {v: 0 for v in range(nv)}
        done_b = {v: set() for v in range(nv)}
        pending_w: list[list[Op]] = [[] for _ in range(p)]
        total = 3 * m * nv
        count = 0
        while count < total:
            # the free rank with the earliest clock that has something it can run now
            best = None
            for r in range(p):
                t = self.rank_time[r]
                cands = []
                for v in stages_of[r]:
                    for mb in range(m):
                        op = Op("B", v, mb)
                        if op in self.end or mb in done_b[v] or Op("F", v, mb) not in self.end:
                            continue
                        rt = self.ready_at(op)
                        if rt is not None:
                            cands.append((0, rt, -v, mb, op))
                        break
                    if next_f[v] < m:
                        op = Op("F", v, next_f[v])
                        rt = self.ready_at(op)
                        if rt is not None and self.in_flight_v[v] < limits[v]:
                            # ZB-V: prefer the later chunk's F (it unblocks the backward sooner)
                            cands.append((1, rt, -v, op.mb, op))
                for op in pending_w[r]:
                    cands.append((2, t, 0, op.mb, op))
                    break
                if not cands:
                    continue
                now = [c for c in cands if c[1] <= t + 1e-12]
                pick = min(now) if now else min(cands, key=lambda c: (c[1], c[0]))
                start = max(t, pick[1])
                key = (start, pick[0], r)
                if best is None or key < best[0]:
                    best = (key, r, pick[4], start)
            if best is None:
                raise RuntimeError("greedy schedule deadlocked: a memory limit below one microbatch's forward?")
            _, r, op, start = best
            self.run(r, op, start)
            count += 1
            if op.kind == "F":
                next_f[op.stage] += 1
            elif op.kind == "B":
                done_b[op.stage].add(op.mb)
                pending_w[r].append(Op("W", op.stage, op.mb))
            elif op.kind == "W":
                pending_w[r].remove(op)

    def result(self, name: str, costs: list[StageCosts]) -> ScheduleResult:
        spans, idle = [], []
        for r in range(self.p):
            first = self.first_f[r] or 0.0
            span = self.rank_time[r] - first
            spans.append(span)
            idle.append(span - self.busy[r])
        work = max(self.m * (c.f + c.b + c.w) for c in costs)
        step = max(self.end.values()) if self.end else 0.0
        return ScheduleResult(
            name=name,
            step_time=step,
            stage_spans=tuple(spans),
            bubble_rate=1.0 - work / max(spans) if max(spans) > 0 else 0.0,
            idle=tuple(idle),
            peak_bytes=tuple(costs[r].resident + self.peak[r] for r in range(self.p)),
            order=tuple(tuple(o) for o in self.order),
        )


def simulate(name: str, costs: list[StageCosts], m: int, *, comm: float = 0.0,
             in_flight: list[float] | None = None) -> ScheduleResult:
    """Simulate schedule ``name`` (one of :data:`SCHEDULES`) for ``m`` microbatches over ``len(costs)`` ranks.

    The zero-bubble schedules are greedy under a limit on microbatches in flight per stage (forward
    done, B not yet: the zero-bubble paper's notion): ZB-H1 what 1F1B keeps (``p-s`` on stage s),
    ZB-H2 ``2(p-s)-1``, ZB-V ``p`` per chunk; ``in_flight`` overrides them. A deferred W's hand-off
    (``mem_w``) is not limited but is counted in the reported peak, so a schedule that defers many
    W shows it there, and :func:`choose` weighs it against the budget."""
    p = len(costs)
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; accepted: {', '.join(SCHEDULES)}")
    if m < 1 or p < 1:
        raise ValueError(f"need at least one stage and one microbatch (got {p} stages, {m} microbatches)")
    nv = 2 * p if name == "ZB-V" else p
    eng = _Engine(costs, p, m, nv, comm)
    if name == "1F1B":
        eng.fixed(_order_1f1b(p, m))
        return eng.result(name, costs)
    if in_flight is None:
        in_flight = {
            "ZB-H1": [p - s for s in range(p)],
            "ZB-H2": [2 * (p - s) - 1 for s in range(p)],
            "ZB-V": [p] * p,
        }[name]
    eng.greedy([in_flight[_rank_of(v, p, nv)] for v in range(nv)])
    return eng.result(name, costs)


def simulate_orders(name: str, orders: list[list[Op]], costs: list[StageCosts], m: int, *,
                    comm: float = 0.0) -> ScheduleResult:
    """Simulate given per-rank op orders (e.g. the ``pipeline_order`` of a ``torch.distributed.pipelining``
    schedule, see :func:`orders_from_pytorch`); virtual stages beyond ``len(costs)`` are V-mapped."""
    nv = 1 + max((op.stage for rank in orders for op in rank), default=0)
    eng = _Engine(costs, len(costs), m, nv, comm)
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
    none does) and all the results, fastest first."""
    results = sorted((simulate(s, costs, m, comm=comm) for s in schedules), key=lambda r: r.step_time)
    fitting = [r for r in results if r.fits(budget)]
    return (fitting[0] if fitting else None), results
