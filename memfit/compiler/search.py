"""The searches that run compile attempts and keep one.

Each is a function of the backend (for its options and budget) and of the graph, that builds
:class:`~memfit.compiler.attempt.Attempt` values and returns the one it keeps; nothing it tries leaves
a trace on the backend. The rules by which one attempt is kept over another are in
:mod:`memfit.planner.choice`.

* :func:`compile_eager`, :func:`compile_analysis`: one attempt (the eager inner compiler; the
  fake-tensor analysis path).
* :func:`compile_inductor`: the Inductor re-plan loop: compile, replay the compiled buffer plans,
  and plan again for a smaller budget while the compiled step is over the budget.
* :func:`stream_or_not`: ``passes="auto"`` with a budget: compile without streaming, and where no exact
  plan fits that way, stream the graph's token-wise regions and compile again.
* :func:`stream`: the stream pass on the Dynamo graph with the chunk-count search: more regions,
  attentions by query chunks and more chunks while the predicted peak is over the budget, then the
  fewest chunks that still fit.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.fx

from memfit.compiler.attempt import Attempt, note_and_warn
from memfit.errors import BudgetError, CantApply, Note, is_note
from memfit.planner import choice
from memfit.planner.shapes import data_dependent, has_symbolic_sizes, symbolic_inputs
from memfit.units import format_bytes

aten = torch.ops.aten

#: compile_one(backend, gm, example_inputs, notes) -> the Attempt kept (raises BudgetError when none fits)
CompileOne = Callable[[Any, torch.fx.GraphModule, Sequence[Any], list], Attempt]


def compile_eager(backend, gm, example_inputs, notes) -> Attempt:
    """One attempt with the eager inner compiler (its plan is exact in the memory model: no re-plan)."""
    attempt = Attempt(backend, notes)
    attempt.compile_eager(gm, example_inputs)
    return attempt


def compile_analysis(backend, gm, example_inputs, notes) -> Attempt:
    """Trace and partition as the backend would, then run the graphs eagerly (for fake tensors).

    With ``inner="inductor"`` the joint graph gets Inductor's decompositions, its joint-graph passes and
    the min-cut partition, so the analysis sees the graphs Inductor would be handed. (Without the
    joint-graph passes a GPT's cross-entropy backward keeps a [tokens, vocab] ``scatter`` that Inductor
    rewrites away: 65 MiB predicted against 39 MiB measured.)"""
    attempt = Attempt(backend, notes)
    if backend.options.inner == "eager":
        attempt.compile_eager(gm, example_inputs)
    else:
        attempt.compile_eager(gm, example_inputs, joint_partitioner="mincut",
                              decompositions=backend.decompositions(), joint_passes=True)
    return attempt


class _Try(NamedTuple):
    """One compile of a graph under Inductor (see :func:`compile_inductor`)."""

    peak: int  # the step peak replayed from Inductor's buffer plans
    attempt: Attempt
    tighten: float  # planning budget / budget


def compile_inductor(backend, gm, example_inputs, notes) -> Attempt:
    """Compile with Inductor, then check the step as Inductor compiled it against the budget.

    The planner's memory model sees the FX graph; Inductor then rewrites, fuses, works in place and
    hands dead buffers to later allocations, which moved a 2-layer GPT's peak from 7.40 MiB (modelled)
    to 11.60 MiB (measured). So each compiled graph's buffer plan is replayed
    (``memfit.planner.inductor_plan``), and a graph whose replayed step peak is over the budget is
    planned again for a budget smaller by the overshoot and recompiled, up to
    ``choice.INDUCTOR_REPLANS`` times, then once more with the planner's smallest-peak plan (also where
    no tighter plan exists). The compile with the lowest replayed peak is kept; if it is over the budget,
    :class:`BudgetError` states its peak (with ``strict=False``: its notes say so, and a warning).
    Measured on an 8-layer GPT sweep (``benchmarks/checkpoint_vs_memory_budget.py``): replayed peaks
    within 0.5% of the allocator's at every budget."""
    budget = backend.step_budget().budget
    tries: list[_Try] = []
    infeasible: list[str] = []  # every try's verdicts (strict=False), whichever try is kept
    tighten, last_resort = 1.0, False  # last_resort: the planner's smallest-peak plan has been asked for
    while True:
        attempt = Attempt(backend, notes, tighten=tighten)
        try:
            attempt.compile_inductor(gm, example_inputs)
        except BudgetError as e:
            if not tries and not last_resort and 0 < e.smallest_peak <= budget * choice.REPLAY_BEFORE_REFUSING:
                # refused on the FX model: compile the smallest-peak plan and judge its replay instead
                tighten, last_resort = _smallest_plan_target(e, budget), True
                continue
            if not tries:
                raise
            if not last_resort and _smallest_plan_is_new(e, tries[-1], tighten, budget):
                # no plan fits the tighter budget: the planner's smallest-peak plan is the last resort
                tighten, last_resort = _smallest_plan_target(e, budget), True
                continue
            break  # keep the best compile so far
        infeasible.extend(attempt.infeasible)
        new = attempt.records
        peak = max((r.peak_bytes for r in new), default=0)
        tries.append(_Try(peak, attempt, tighten))
        if budget is None or peak <= budget or not new or any(r.compiled is None for r in new):
            break
        if any(is_note(n, "kept_smallest") for r in new for n in r.notes):
            break  # strict=False and already the smallest-peak plan: a tighter budget changes nothing
        if last_resort or len(tries) > choice.INDUCTOR_REPLANS + 1:
            break
        if len(tries) > choice.INDUCTOR_REPLANS:
            # Re-planning is out of tries, every compile over the budget: ask the planner for a plan
            # under a budget it cannot meet, so that it names its smallest-peak plan, then compile
            # that one. Inductor's peak does not fall monotonically with the planned one (a 2-layer
            # GPT under one CPU calibration: planned 10.40 MiB -> compiled 11.47, planned 9.9 ->
            # 11.60, while the smallest-peak plan, 9.27, compiles to 9.78 and fits an 11.02 budget);
            # before this, the loop ended before reaching it and the graph was refused (a CI run).
            tighten *= choice.SMALLEST_PLAN_SCALE
            continue
        tighten *= budget / peak * choice.REPLAN_SLACK
    kept = min(tries, key=lambda t: t.peak)
    _settle(backend, kept, tries, budget)
    kept.attempt.infeasible = infeasible
    return kept.attempt


def _smallest_plan_target(e: BudgetError, budget: int) -> float:
    """The ``tighten`` that plans for exactly the smallest reachable peak ``e`` names."""
    return e.smallest_peak / (budget * choice.plan_margin(fused=True)) * choice.SMALLEST_PLAN_EPS


def _smallest_plan_is_new(e: BudgetError, last: _Try, tighten: float, budget: int) -> bool:
    """Whether the smallest-peak plan ``e`` names lies between the refused planning budget and the last
    compiled one (so it is a plan not compiled yet)."""
    planned_before = max((r.analysis.memory.peak_bytes for r in last.attempt.records), default=0)
    return 0 < e.smallest_peak < planned_before and tighten < _smallest_plan_target(e, budget) < last.tighten


def _settle(backend, kept: _Try, tries: list[_Try], budget: int | None) -> None:
    """Refuse (strict) or annotate the kept compile: the replayed peak of every try, and a warning where
    the kept one is still over the budget."""
    peak, records = kept.peak, kept.attempt.records
    if budget is not None and peak > budget and backend.strict and any(r.compiled is not None for r in records):
        err = BudgetError(
            peak, budget, hints=[
                f"the smallest peak is that of Inductor's compiled buffer plan over {len(tries)} plan(s) (the "
                f"planner's own model predicted {format_bytes(max(r.analysis.memory.peak_bytes for r in records))}); "
                "raise the budget, or shrink the batch or sequence", *backend.hints(peak)]
        )
        if len(records) == 1 and records[0].before_pair is not None:
            err.baseline = (records[0].before_pair, records[0].before)
        raise err
    for r in records:
        if len(tries) > 1:
            r.notes.append(Note(
                "inductor: replayed compiled peaks per try " + ", ".join(format_bytes(t.peak) for t in tries)
                + f"; kept the lowest ({format_bytes(peak)})",
                "inductor",
            ))
        if budget is not None and r.compiled is not None and r.compiled.peak_bytes > budget:
            msg = (
                f"memfit: graph {r.name} as Inductor compiled it has a step peak of {format_bytes(r.compiled.peak_bytes)} "
                f"(replayed from its buffer plan), over the budget of {format_bytes(budget)}; the planner's "
                f"model predicted {format_bytes(r.analysis.memory.peak_bytes)}"
            )
            note_and_warn(r, msg)


# -- stream or not --------------------------------------------------------------------------------
def _held(compile_one: CompileOne, backend, graph, example_inputs, notes) -> Attempt:
    """An attempt held until one is kept: its warnings recorded, its refusal caught."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            got = compile_one(backend, graph, example_inputs, notes)
        except BudgetError as e:
            got = Attempt(backend)
            got.error = e
    got.caught = list(caught)
    return got


def _keep(got: Attempt) -> Attempt:
    for w in got.caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if got.error is not None:
        raise got.error
    return got


def _fits_exactly(got: Attempt, budget: int, margin: float = 1.0) -> bool:
    return got.error is None and choice.fits_exactly(got.records, got.infeasible, budget, margin)


def stream_or_not(backend, compile_one: CompileOne, gm, example_inputs) -> Attempt:
    """``passes="auto"``: compile without streaming; if no exact plan fits the budget that way (the
    graph is over it, or only a few-bit plan fits), stream its token-wise regions and plan again.

    Why last resort: streaming runs each region chunk by chunk, graphs that Inductor cannot fuse across
    chunks (1.09x the step of a 2-layer GPT with a 32k vocabulary with the LM head streamed, 1.23x with
    every region, ``benchmarks/stream.py``; 2.3-2.6x for a 4-layer GPT at its lowest budgets),
    but it is the only exact technique that removes the LM head's ``[tokens, vocab]`` logits, which
    are the floor of every checkpoint plan (``benchmarks/acceptance.py``: a nanoGPT GPT at 0.6x and
    0.45x of its plain peak fits only streamed). The compile with streaming is kept if it fits
    exactly; else the one whose peak is lower (or the fitting few-bit one)."""
    budget = backend.step_budget().budget
    plain = _held(compile_one, backend, gm, example_inputs, [])
    if _fits_exactly(plain, budget):
        return _keep(plain)
    only_fewbit = plain.error is None and not plain.infeasible  # fits, but approximately
    why = ("only a few-bit (approximate) plan fits" if only_fewbit
           else f"no plan fits without it (smallest peak {format_bytes(plain.peak)})")
    notes = [Note(f"auto: {why}; streaming the token-wise regions along the sequence", "auto", "retry")]
    # the user did not name the pass: a refusal is a note in the record (and the report), not a warning
    streamed_gm, notes = stream(backend, gm, example_inputs, notes, warn=False)
    if streamed_gm is gm:  # nothing to stream; the plain compile stands, with the reason
        for r in plain.records[:1]:
            r.notes.extend(notes)
        return _keep(plain)
    streamed = _held(compile_one, backend, streamed_gm, example_inputs, notes)
    stream_decisions(streamed, streamed_gm)
    kept = None
    try:
        kept = _keep_streamed_or_not(backend, plain, streamed, budget, only_fewbit)
        return kept
    finally:
        if kept is not streamed:  # the plain compile is kept, or neither: no compiled code runs these regions
            release_streamed(streamed_gm)


def _plain_before(plain: Attempt, streamed: Attempt) -> None:
    """The streamed records' "before" is the step without streaming, as the baseline partition left it
    (what plain ``torch.compile`` runs), not the streamed graph unplanned: a report read "44.05 MiB ->
    44.05 MiB" for a 103 MiB step that auto streamed."""
    if plain.error is not None:
        if plain.error.baseline is not None and len(streamed.records) == 1:
            streamed.records[0].before_pair, streamed.records[0].before = plain.error.baseline
        return
    for r, p in zip(streamed.records, plain.records):
        r.before_pair, r.before = p.before_pair or p.pair, p.before or p.analysis


def _keep_streamed_or_not(backend, plain: Attempt, streamed: Attempt, budget: int, only_fewbit: bool) -> Attempt:
    """Of the two compiles, keep the streamed one if it fits exactly; else the lower peak (or the
    fitting few-bit one); with ``strict``, refuse when neither fits."""
    margin = backend.plan_margin
    for r in streamed.records:  # what the report and the candidates table call the choice
        r.partition = f"stream + {r.partition}"
        for c in r.candidates:
            c["label"] = f"stream + {c['label']}"
    _plain_before(plain, streamed)
    if _fits_exactly(streamed, budget, margin):
        return _keep(streamed)
    if only_fewbit:
        kept, other = plain, streamed
    else:
        kept, other = (streamed, plain) if choice.keep_streamed(streamed.peak, plain.peak) else (plain, streamed)
        if backend.strict:
            # a streamed compile refused by the planner states its FX-level peak, planned with the margin; one
            # compiled (and over the budget) states its replayed peak, which needs none
            s_margin = streamed.error.margin if streamed.error is not None else 1.0
            if streamed.peak / s_margin < plain.peak:
                why = " (the margin: Inductor's buffer plans do not show a stream op's chunks)" if s_margin < 1 else ""
                raise BudgetError(streamed.peak, budget, s_margin, hints=[
                    f"the smallest peak is with the stream pass{why}", *backend.hints(streamed.peak, s_margin)])
            raise BudgetError(plain.peak, budget, hints=[
                f"streaming did not lower it (smallest streamed peak {format_bytes(streamed.peak)})",
                *backend.hints(plain.peak)])
    for r in kept.records[:1]:
        r.notes.append(Note(
            f"auto: compiled {'with' if kept is streamed else 'without'} streaming; the other way's smallest "
            f"peak was {format_bytes(other.peak)}",
            "auto", "choice",
        ))
        if kept is streamed and not kept.infeasible and kept.peak > budget * margin:  # strict=False: say so
            err = BudgetError(kept.peak, budget, margin, hints=backend.hints(kept.peak, margin))
            r.notes.append(Note(f"does not fit: {str(err).splitlines()[0]}", None, "kept_smallest"))
            kept.infeasible.append(str(err))
    return _keep(kept)


# -- the stream pass and its chunk search ---------------------------------------------------------
def release_streamed(*graphs) -> None:
    """Forget the stream regions of graphs a search dropped: no compiled code will run them (the kept
    graph's regions stay registered; see ``memfit.kernels.stream``)."""
    from memfit.kernels.stream import release

    for g in graphs:
        release(g.meta.pop("memfit_stream_keys", ()))


class _Streamed(NamedTuple):
    """One run of the stream pass: the graph (``gm`` itself when not applied), its plan, its notes."""

    graph: torch.fx.GraphModule
    plan: Any
    notes: list


def stream(backend, gm, example_inputs, notes: Sequence[str] = (), *, warn: bool = True) -> tuple[torch.fx.GraphModule, list]:
    """Run the stream pass on the Dynamo graph (before AOTAutograd); returns the graph and the notes
    (``notes`` plus the pass's) for the graph's record.

    With a budget and no fixed ``stream_chunks``, more is streamed while the predicted peak of the whole
    step is over the budget (less the planning margin: under Inductor a stream op's chunk scratch is
    modelled, not replayed from its buffer plan): the n largest regions, then every region, then
    attentions by query chunks with the chunk counts times ``choice.STREAM_CHUNK_MULTIPLIERS``; each try
    is traced and partitioned as the backend would (:func:`predicted_peak`), without compiling. A try
    that fits at the default counts is then widened (:func:`fewer_chunks`)."""
    budget = backend.step_budget().budget
    searched = budget is not None and backend.options.stream_chunks is None
    margin = backend.plan_margin
    # (regions kept: the n largest, None = all; chunk multiplier; attention by query chunks)
    tries = [(None, 1, False)]
    if searched:
        n = region_count(backend, gm, example_inputs)
        if n:
            tries = [(k, 1, False) for k in range(1, n)] + [(None, 1, False)]
        tries += [(None, m, True) for m in choice.STREAM_CHUNK_MULTIPLIERS]
    start, retries = list(notes), []
    got = _Streamed(gm, None, start)
    for i, (largest, mult, attention) in enumerate(tries):
        if got.graph is not gm:
            release_streamed(got.graph)  # the previous try: over the budget
        got = stream_once(backend, gm, example_inputs, start + retries, mult, largest, attention=attention, warn=warn)
        if got.graph is gm or i == len(tries) - 1:
            break
        peak = predicted_peak(backend, got.graph, example_inputs)
        if peak is not None and peak <= budget * margin:
            if mult == 1:
                got = fewer_chunks(backend, gm, example_inputs, got, largest, attention, budget * margin, start + retries)
            break
        what = f"the {largest} largest region(s)" if largest else f"every region, chunk counts x{mult}" + (
            ", attentions by query chunks" if attention else "")
        retries.append(Note(
            f"stream: streaming {what}, "
            + (f"the predicted peak {format_bytes(peak)} is over" if peak else "no checkpoint plan fits")
            + f" the budget {format_bytes(budget)}" + (f" less the {100 * (1 - margin):.0f}% margin" if margin < 1 else "")
            + "; trying more",
            "stream", "retry",
        ))
    return got.graph, list(got.notes)


def fewer_chunks(backend, gm, example_inputs, got: _Streamed, largest, attention, limit, base_notes) -> _Streamed:
    """The streamed graph that fits ``limit`` with the fewest chunks: the planner's default counts times
    ``choice.FEWER_CHUNK_FRACTIONS`` (2 chunks at least) while the predicted peak still fits.

    Why: wider chunks make wider matmuls and fewer chunk launches. Measured (``benchmarks/stream.py``
    part 1: 2-layer GPT, 32k vocabulary, 4096 tokens, Inductor, paired against the plain step's
    1085 ms): every region in 32 chunks 1.306x, 16 chunks 1.188x, 8 chunks 1.129x; the LM head alone
    in 32 chunks (what a budget of a quarter of the plain peak needed) 1.163x. The planner's default
    (128 tokens a chunk) is the memory-minded count for no budget; under a budget the time-minded
    one is the fewest that fit."""
    counts = [r.chunks for r in got.plan.regions]
    for frac in choice.FEWER_CHUNK_FRACTIONS:
        wider = stream_once(backend, gm, example_inputs, base_notes, frac, largest, attention=attention)
        if wider.graph is gm or [r.chunks for r in wider.plan.regions] == counts:
            if wider.graph is not gm:
                release_streamed(wider.graph)
            break
        peak = predicted_peak(backend, wider.graph, example_inputs)
        if peak is None or peak > limit:
            release_streamed(wider.graph)
            break
        release_streamed(got.graph)  # the narrower chunks, now replaced
        note = Note(
            "stream: fewer chunks fit the budget too ("
            + ", ".join(f"{r.name} {k} -> {r.chunks}" for r, k in zip(wider.plan.regions, counts))
            + f"; predicted {format_bytes(peak)}): fewer, wider chunks run faster",
            "stream", "applied",
        )
        got = _Streamed(wider.graph, wider.plan, wider.notes + [note])
        counts = [r.chunks for r in wider.plan.regions]
    return got


def predicted_peak(backend, gm, example_inputs) -> int | None:
    """The predicted peak of ``gm``'s step (None: no plan fits), from an analysis attempt that is then
    dropped (``gm`` is already streamed: the probe does not stream again)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a probe's "over the budget" is not the final word
            probe = compile_analysis(backend, gm, example_inputs, [])
    except BudgetError:
        return None
    return probe.records[-1].analysis.memory.peak_bytes if probe.records else None


def region_count(backend, gm, example_inputs) -> int:
    """How many regions the stream planner finds in ``gm`` at its default counts (0: none)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the real attempt says why, once
        got = stream_once(backend, gm, example_inputs, [], 1, None, apply=False)
    return len(got.plan.regions) if got.plan is not None else 0


def stream_once(backend, gm, example_inputs, notes, multiplier: float, largest: int | None = None,
                apply: bool = True, attention: bool = False, warn: bool = True) -> _Streamed:
    """Plan the stream pass for ``gm`` (the ``largest`` regions, chunk counts times ``multiplier``,
    attentions by query chunks or not) and carry the plan out on an ATen copy of ``gm``. A refusal is a
    note, and a warning when ``warn`` (the user named the pass)."""
    from memfit.passes import stream as sp
    from memfit.planner.stream import plan_stream

    notes = list(notes)
    try:
        if symbolic_inputs(example_inputs) or has_symbolic_sizes(gm, key="example_value", placeholders_only=True):
            raise CantApply("dynamic shapes: streaming needs a static sequence length (compile with dynamic=False)",
                            "dynamic_shapes")
        dd = data_dependent(gm, key="example_value")
        if dd:
            # tracing such a graph to ATen raised DynamicOutputShapeException, which Dynamo took for a graph
            # break: the step ran eagerly, outside any plan, without a word
            raise CantApply(
                f"data-dependent sizes ({', '.join(dd[:3])}): the stream pass cuts a graph of known sizes into "
                "chunks, and these sizes are known only when the step runs", "dynamic_shapes")
        traced = sp.to_aten(gm, example_inputs)
        need = sp.needs_grad(traced, example_inputs)
        plan, info = plan_stream(traced, example_inputs, backend.options, need, multiplier, largest, attention)
        if not plan.regions:
            raise CantApply("no token-wise region with a matmul or a softmax; " + "; ".join(plan.notes), "nothing_to_do")
        if not apply:
            return _Streamed(traced, plan, notes)
        sp.apply(traced, plan, need, info.layout)
    except CantApply as e:
        notes.append(e.note("stream"))
        if warn:
            warnings.warn(f"memfit: stream pass not applied: {e.reason}", stacklevel=4)
        return _Streamed(gm, None, notes)
    notes.extend(Note(n, "stream") for n in plan.notes)
    traced.meta["memfit_stream_plan"] = plan  # for the record's decision rows (stream_decisions)
    return _Streamed(traced, plan, notes)


def stream_decisions(attempt: Attempt, gm) -> None:
    """One decision row per region streamed in ``gm``, on the attempt's first record: what the report's
    "Decisions" lists (before, a streamed step read "No pass changed the graphs")."""
    from memfit.planner.cost import node_vals, tensor_bytes
    from memfit.planner.memory import source_of

    plan = gm.meta.get("memfit_stream_plan")
    if plan is None or not attempt.records:
        return
    record = attempt.records[0]
    nodes = {n.name: n for n in gm.graph.nodes}
    for region in plan.regions:
        # the region's largest matmul (its LM head, its MLP) names the module and the source line
        inside = [nodes[n] for n in region.nodes if n in nodes]
        mm = [n for n in inside if n.target in (aten.mm.default, aten.addmm.default, aten.bmm.default)]
        where = max(mm or inside, key=lambda n: sum(tensor_bytes(v) for v in node_vals(n)), default=None)
        module, source = source_of(where) if where is not None else ("", "")
        detail = [f"{len(region.nodes)} ops, {format_bytes(region.region_bytes)} of intermediates for the whole sequence"]
        if region.grad_in_forward:
            detail.append("gradients computed in the forward")
        if region.attentions:
            detail.append(f"{len(region.attentions)} attention(s) by query chunks")
        record.decisions.append({
            "graph": record.name, "technique": "stream", "action": f"stream in {region.chunks} chunks",
            "value": region.name, "op": "region", "bytes": int(region.region_bytes), "module": module,
            "source": source, "detail": "; ".join(detail),
        })


__all__ = [
    "CompileOne",
    "compile_analysis",
    "compile_eager",
    "compile_inductor",
    "fewer_chunks",
    "predicted_peak",
    "region_count",
    "stream",
    "stream_decisions",
    "stream_once",
    "stream_or_not",
]
