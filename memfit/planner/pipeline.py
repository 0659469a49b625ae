"""Pipeline planning: which schedule and which per-stage checkpoint plan make the fastest step that fits.

Given one microbatch's step of the whole model (traced on fake tensors, as ``memfit plan`` does), the
model is cut into ``stages`` equal stages (a transformer's repeated layers split evenly; embeddings and
head are not modelled apart). For each stage the candidates are its activation plans: no
checkpointing, or a point of the checkpoint planner's budget-vs-time curve (fewer bytes held per
microbatch, more time in B for the recomputation). Each is simulated under every published schedule
(:data:`memfit.planner.schedule.SCHEDULES`) with communication; the plan is the fastest simulated step
whose every rank's peak stays within the per-stage budget, ties to the smaller peak.

Why all the pairs: a tight budget can be met either by a schedule that holds fewer microbatches
(V-Half holds (p+2)//2, V-Min (p+4)//3, against 1F1B's p) or by checkpointing under a schedule with
more in flight (ZB-H2, 2p-1); which is faster depends on the recompute time against the bubble, and
only the simulation tells. ``memfit plan examples/gpt.py --pipeline-stages 4 --microbatches 8 --budget
40MiB --comm-ms 0.5`` (2026-12-02): ZB-V without checkpointing is fastest (489 ms predicted) but holds
98 MiB a stage; within 40 MiB the plan is V-Min with checkpointing keeping 79% of the activations and W
recomputing (683 ms, 39 MiB), ahead of any schedule holding more microbatches with deeper checkpointing.

With checkpointing, each plan comes twice: W holding what it needs of B's recomputation, or W
recomputing it (less held between B and W, more time in W, which a zero-bubble schedule may hide in
a bubble). Not modelled (said in the report): uneven stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from memfit.planner.schedule import SCHEDULES, ScheduleResult, StageCosts, choose


@dataclass(frozen=True)
class StageOption:
    """One per-stage activation plan: its per-microbatch costs on each stage."""

    label: str
    costs: StageCosts
    recompute_s: float = 0.0
    """Seconds of recomputation the plan adds to each stage's B (and W, where W recomputes), per microbatch."""


@dataclass(frozen=True)
class Considered:
    schedule: str
    option: str
    step_time: float
    bubble_rate: float
    peak_activations: int
    """Largest over ranks: activation bytes at once (resident excluded)."""
    fits: bool


@dataclass(frozen=True)
class PipelinePlan:
    stages: int
    microbatches: int
    budget: int | None
    """Per-stage activation budget in bytes (above resident memory)."""
    comm_s: float
    chosen: ScheduleResult | None
    option: StageOption | None
    considered: tuple[Considered, ...]
    smallest_peak: int
    """The least activation peak any candidate reaches (what a refusal reports)."""
    notes: tuple[str, ...] = field(default=())
    baseline: Considered | None = None
    """1F1B with the first stage option (no checkpointing): what the verdict compares with."""

    @property
    def fits(self) -> bool:
        return self.chosen is not None

    def verdict(self) -> str:
        if self.chosen is None:
            return (f"does not fit: the smallest per-stage activation peak any schedule and checkpoint plan reaches "
                    f"is {_fmt(self.smallest_peak)}, over the budget {_fmt(self.budget)}")
        base = self.baseline
        vs = f", {base.step_time / self.chosen.step_time:.2f}x the speed of 1F1B with {base.option}" if base else ""
        return (f"{self.chosen.name} with {self.option.label}: step {self.chosen.step_time * 1e3:.2f} ms, "
                f"bubble {100 * self.chosen.bubble_rate_synced:.1f}%, peak activations/stage "
                f"{_fmt(_act_peak(self.chosen, self.option))}" + (f" within {_fmt(self.budget)}" if self.budget else "")
                + vs)


def _fmt(n: int | None) -> str:
    from memfit.units import format_bytes

    return "no budget" if n is None else format_bytes(n)


def _act_peak(r: ScheduleResult, option: StageOption) -> int:
    return max(b - option.costs.resident for b in r.peak_bytes)


def plan(options: list[StageOption], stages: int, microbatches: int, *, budget: int | None = None,
         comm_s: float = 0.0, schedules: tuple[str, ...] = SCHEDULES) -> PipelinePlan:
    """Simulate every (schedule, stage option) pair; choose the fastest whose activation peak on every
    rank fits ``budget`` (ties: smaller peak). Schedules whose shape does not apply are left out with a
    note (interleaved 1F1B needs the microbatches to be a multiple of the stages)."""
    if stages < 2:
        raise ValueError(f"a pipeline needs at least 2 stages (got {stages})")
    if microbatches < 1:
        raise ValueError(f"need at least one microbatch (got {microbatches})")
    if not options:
        raise ValueError("no stage options to plan with")
    notes = []
    if "1F1B-I" in schedules and microbatches % stages:  # choose() leaves it out
        notes.append(f"1F1B-I left out: {microbatches} microbatches are not a multiple of {stages} stages")
    considered, fitting, baseline = [], [], None
    for opt in options:
        # the budget is on activations; choose() weighs whole peaks, resident memory included
        limit = None if budget is None else budget + opt.costs.resident
        best, results = choose([opt.costs] * stages, microbatches, budget=limit, comm=comm_s, schedules=schedules)
        for r in results:
            row = Considered(r.name, opt.label, r.step_time, r.bubble_rate_synced, _act_peak(r, opt), r.fits(limit))
            considered.append(row)
            if opt is options[0] and r.name == "1F1B":
                baseline = row
        if best is not None:
            fitting.append((best, opt))
    chosen, option = min(fitting, key=lambda x: (x[0].step_time, _act_peak(*x))) if fitting else (None, None)
    considered.sort(key=lambda c: (not c.fits, c.step_time, c.peak_activations))
    return PipelinePlan(
        stages=stages, microbatches=microbatches, budget=budget, comm_s=comm_s, chosen=chosen, option=option,
        considered=tuple(considered), smallest_peak=min(c.peak_activations for c in considered), notes=tuple(notes),
        baseline=baseline,
    )


WEIGHT_GEMMS = ("aten.mm.default", "aten.addmm.default")
"""Forward ops whose weight gradient is a GEMM of the same FLOPs (dW = dY^T X): W's share of the backward."""


def stage_options_from_step(backend, stages: int, *, param_bytes: int = 0, resident_per_param: float = 2.0) -> list[StageOption]:
    """Per-stage options from one traced microbatch step of the whole model (``memfit.trace.trace_step``,
    with a budget it fits and ``curve_points`` for the checkpoint curve).

    F = the forward graphs' predicted time / stages; W = the forward's weight GEMMs' time (each has a
    dW GEMM of the same shape), B = the rest of the backward (a middle stage's B computes the input
    gradients; the whole model's own split cannot say, since its inputs are token ids: everything is W
    there); ``mem_f`` the saved activations; ``mem_w`` what B hands W, bounded by ``mem_f`` (the
    weight GEMMs' inputs and output gradients; taken as all of ``mem_f``: memfit's W holds X and dY);
    ``resident``: parameters and gradients (``resident_per_param`` times the parameters). A checkpoint
    point of the curve at peak P with recompute R saves the unchanged peak minus P less per microbatch
    and adds R to B; W then holds what it needs of the recomputed values from B (taken as all of the
    unchanged activations) or recomputes them itself (R added to W too, and W holds only what was kept).
    The split planner makes the same choice per compiled stage, by bytes held
    (:func:`memfit.planner.split_backward.plan_split`)."""
    records = backend.latest_records()
    f = bw = w = 0.0
    saved = base_peak = 0
    curve: list[tuple[int, float]] = []
    for r in records:
        a = r.before or r.analysis
        f += sum(c.time_s for c in a.costs if c.graph.endswith(".fw"))
        bw += sum(c.time_s for c in a.costs if not c.graph.endswith(".fw"))
        w += sum(c.time_s for c in a.costs if c.graph.endswith(".fw") and c.target in WEIGHT_GEMMS)
        saved += a.memory.saved_bytes
        base_peak += a.memory.peak_bytes
        for c in r.candidates:
            curve += [(int(p), float(t)) for p, t in c.get("curve") or []]
    w = min(w, bw)
    b = bw - w
    resident = int(param_bytes * resident_per_param / stages)
    options = [StageOption("no checkpointing", StageCosts(f / stages, b / stages, w / stages, saved // stages,
                                                          saved // stages, resident))]
    seen = {saved}
    for peak, extra in sorted(curve):
        keep = saved - max(0, base_peak - peak)
        if keep <= 0 or keep >= saved or keep in seen or extra <= 0:
            continue
        seen.add(keep)
        share = f"{100 * keep / saved:.0f}% of activations kept"
        # B recomputes the forward; W then either holds what it needs of it from B (up to all of the
        # unchanged activations) or computes it again itself from what was kept (W's recompute)
        options.append(StageOption(
            f"checkpointing ({share}), W holds",
            StageCosts(f / stages, (b + extra) / stages, w / stages, keep // stages, saved // stages, resident),
            recompute_s=extra / stages,
        ))
        options.append(StageOption(
            f"checkpointing ({share}), W recomputes",
            StageCosts(f / stages, (b + extra) / stages, (w + extra) / stages, keep // stages, keep // stages, resident),
            recompute_s=2 * extra / stages,
        ))
    return options


def to_json(p: PipelinePlan, title: str = "") -> dict:
    ch = p.chosen
    return {
        "title": title,
        "verdict": p.verdict(),
        "stages": p.stages,
        "microbatches": p.microbatches,
        "budget_per_stage": p.budget,
        "comm_s": p.comm_s,
        "fits": p.fits,
        "smallest_peak": p.smallest_peak,
        "chosen": None if ch is None else {
            "schedule": ch.name, "option": p.option.label, "step_time_s": ch.step_time,
            "bubble_rate": ch.bubble_rate_synced, "peak_bytes_per_rank": list(ch.peak_bytes),
            "stage_costs": p.option.costs.__dict__,
            "timeline": [[[op.kind, op.stage, op.mb, s, e] for op, s, e in rank] for rank in ch.timeline],
        },
        "considered": [c.__dict__ for c in p.considered],
        "notes": list(p.notes) + list(NOT_MODELLED),
    }


NOT_MODELLED = (
    "stages are equal shares of the model (embeddings and head not apart)",
    "without checkpointing W holds what B hands it as all of the saved activations (an upper bound: X and dY of "
    "each weight GEMM)",
)


def write_report(p: PipelinePlan, path: str, title: str = "") -> list[str]:
    """The pipeline plan as HTML (timeline of the chosen schedule: ranks x time, F/B/W coloured; each
    rank's activation memory over time; every schedule considered), Markdown and JSON beside it."""
    import json
    import os

    from memfit.config import report_paths

    paths = report_paths(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    data = to_json(p, title)
    for out in paths:
        ext = os.path.splitext(out)[1].lower()
        text = (_html(p, data) if ext in (".html", ".htm") else _markdown(p, data) if ext == ".md"
                else json.dumps(data, indent=1, default=str))
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
    return paths


def _rows(p: PipelinePlan) -> list[list[str]]:
    rows = []
    for c in p.considered:
        chosen = p.chosen is not None and c.schedule == p.chosen.name and c.option == p.option.label
        rows.append(["*" if chosen else "", c.schedule, c.option, f"{c.step_time * 1e3:.2f} ms",
                     f"{100 * c.bubble_rate:.1f}%", _fmt(c.peak_activations), "fits" if c.fits else "over"])
    return rows


HEAD = ["", "schedule", "activations", "step", "bubble", "peak activations/stage", "budget"]


def _markdown(p: PipelinePlan, data: dict) -> str:
    lines = [f"# {data['title'] or 'Pipeline plan'}", "", f"**{data['verdict']}**", "",
             f"{p.stages} stages, {p.microbatches} microbatches, per-stage activation budget {_fmt(p.budget)}, "
             f"{p.comm_s * 1e3:.3f} ms per hop between ranks.", "", "## Schedules considered", "",
             "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(p)]
    if p.chosen is not None:
        lines += ["", "## Chosen order, per rank", ""]
        for r, ops in enumerate(p.chosen.order):
            lines.append(f"- rank {r}: " + " ".join(f"{op.kind}{op.mb}" + (f".{op.stage}" if len(p.chosen.order) != len(
                {o.stage for rank in p.chosen.order for o in rank}) else "") for op in ops))
    lines += ["", "## Not modelled", ""] + [f"- {n}" for n in data["notes"]]
    return "\n".join(lines) + "\n"


def _html(p: PipelinePlan, data: dict) -> str:
    import html

    rows = "".join("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in r) + "</tr>" for r in _rows(p))
    table = ("<table border=1 cellspacing=0 cellpadding=3><tr>" + "".join(f"<th>{h}</th>" for h in HEAD) + "</tr>"
             + rows + "</table>")
    figs = _figures(p) if p.chosen is not None else ""
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in data["notes"])
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(data['title'])}</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto} svg{max-width:100%;height:auto}</style>"
            f"</head><body><h1>{html.escape(data['title'] or 'Pipeline plan')}</h1><p><b>{html.escape(data['verdict'])}</b></p>"
            f"<p>{p.stages} stages, {p.microbatches} microbatches, per-stage activation budget {_fmt(p.budget)}, "
            f"{p.comm_s * 1e3:.3f} ms per hop between ranks.</p>{figs}<h2>Schedules considered</h2>{table}"
            f"<h2>Not modelled</h2><ul>{notes}</ul></body></html>\n")


COLOURS = {"F": "#4c72b0", "B": "#dd8452", "W": "#55a868", "BW": "#c44e52"}


def _figures(p: PipelinePlan) -> str:
    """Two SVG figures: the chosen schedule's timeline and each rank's activation memory over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memfit.planner.report import _svg

    r, opt = p.chosen, p.option
    ranks = len(r.timeline)
    fig, ax = plt.subplots(figsize=(11, 0.45 * ranks + 1.2))
    for rank, ops in enumerate(r.timeline):
        for op, s, e in ops:
            ax.barh(rank, (e - s) * 1e3, left=s * 1e3, color=COLOURS[op.kind], edgecolor="white", linewidth=0.3)
            if (e - s) > 0.008 * r.step_time:  # the microbatch, where the bar has room for it
                ax.text((s + e) / 2 * 1e3, rank, str(op.mb), ha="center", va="center", fontsize=6, color="white")
    ax.set_yticks(range(ranks), [f"rank {i}" for i in range(ranks)])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_title(f"{r.name}: F blue, B orange, W green, B+W red; numbers are microbatches")
    timeline = _svg(fig)
    fig, ax = plt.subplots(figsize=(11, 3))
    chunks = {}
    for rank, ops in enumerate(r.timeline):
        chunks[rank] = len({op.stage for op, _, _ in ops})
    c = opt.costs
    for rank, ops in enumerate(r.timeline):
        n = chunks[rank]
        level, xs, ys = 0.0, [0.0], [0.0]
        for op, s, e in ops:
            level += {"F": c.mem_f, "B": c.mem_w - c.mem_f, "W": -c.mem_w, "BW": -c.mem_f}[op.kind] / n
            xs.append(e * 1e3)
            ys.append(level / 2**20)
        ax.step(xs, ys, where="post", label=f"rank {rank}")
    if p.budget:
        ax.axhline(p.budget / 2**20, color="k", linestyle="--", linewidth=1, label="budget")
    ax.set_xlabel("time (ms)")
    ax.set_ylabel("activations (MiB)")
    ax.legend(fontsize=7, ncol=min(ranks + 1, 6))
    memory = _svg(fig)
    return f"<h2>Timeline</h2>{timeline}<h2>Activation memory per rank</h2>{memory}"
