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

import math
import re
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


def compile_analysis(backend, gm, example_inputs, notes, *, probe: bool = False, remember=None) -> Attempt:
    """Trace and partition as the backend would, then run the graphs eagerly (for fake tensors).

    With ``inner="inductor"`` the joint graph gets Inductor's decompositions, its joint-graph passes and
    the min-cut partition, so the analysis sees the graphs Inductor would be handed. (Without the
    joint-graph passes a GPT's cross-entropy backward keeps a [tokens, vocab] ``scatter`` that Inductor
    rewrites away: 65 MiB predicted against 39 MiB measured.) ``probe``: a stream search's probe
    (:attr:`Attempt.probe`); ``remember``: see :attr:`Attempt.remember`."""
    attempt = Attempt(backend, notes, probe=probe, remember=remember)
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


def _time(got: Attempt) -> float:
    """The predicted step time of an attempt's graphs (roofline, recomputation and streaming included)."""
    return sum(r.analysis.time_s for r in got.records)


def _unchanged_time(got: Attempt) -> float:
    """The predicted step time of the attempt's graphs as the baseline partition runs them."""
    return sum((r.before or r.analysis).time_s for r in got.records)


class StreamProbe(NamedTuple):
    """One stream configuration the auto search weighed: which regions, at what chunk counts, and the
    predicted peak and time of its step with the checkpoint plan auto would add (fake-tensor analysis)."""

    label: str
    largest: int | None
    multiplier: float
    attention: bool
    counts: tuple
    peak: int | None  # None: no plan fits even streamed this way
    time_s: float
    fits: bool
    graph: Any = None  # the streamed Dynamo graph, kept only for the best probe
    skipped: bool = False  # not planned: its stream ops alone were predicted slower than the best so far


def stream_or_not(backend, compile_one: CompileOne, gm, example_inputs) -> Attempt:
    """``passes="auto"`` with a budget: one search over streaming and checkpointing, by predicted time.

    The graph is compiled without streaming first (checkpoint and the other enabled passes, as auto
    plans them). Where that fits with no recomputation (its predicted time is the unchanged step's), it
    is kept: streaming only adds time. Otherwise stream configurations are weighed
    (:func:`search_streams`: the largest 1, 2, 4, ... regions and every region, each at the chunk
    counts that fit, and every region with attentions by query chunks), each analysed with the checkpoint
    plan it still needs, and the fitting one of least predicted time is compiled if it is predicted
    faster than the compile without streaming (or that one does not fit exactly). Why by time: at 0.6x
    of a 2-layer GPT's plain peak every way of streaming fitted, and the escalation that kept the first
    configuration to fit kept one at 2.2-2.5x the plain step (issue 21); streaming only the LM head and
    the loss, and checkpointing the rest, had not been weighed. The stream time model is calibrated
    (``memfit.planner.cost.CPU_STREAM_FACTOR``; ``benchmarks/auto_sweep.py`` checks the choice)."""
    budget = backend.step_budget().budget
    margin = backend.plan_margin
    plain = _held(compile_one, backend, gm, example_inputs, [])
    plain_fits = _fits_exactly(plain, budget)
    if plain_fits and _time(plain) <= _unchanged_time(plain) * choice.STREAM_SEARCH_FROM:
        return _keep(plain)
    only_fewbit = plain.error is None and not plain.infeasible and not plain_fits  # fits, but approximately
    if plain_fits:
        why = (f"the plan without streaming fits, at {1e3 * _time(plain):.3f} ms predicted against "
               f"{1e3 * _unchanged_time(plain):.3f} ms unchanged")
    elif only_fewbit:
        why = "only a few-bit (approximate) plan fits without streaming"
    else:
        why = f"no plan fits without streaming (smallest peak {format_bytes(plain.peak)})"
    notes = [Note(f"auto: {why}; weighing stream plans along the sequence", "auto", "retry")]
    profile = plain.records[0].analysis.profile if plain.records else None
    from memfit.kernels.stream import twin_pricing

    with twin_pricing():  # probes are priced and dropped: repeated layers traced once (see twin_pricing)
        probes, best, refused, capped, lowest = search_streams(backend, gm, example_inputs, budget * margin, profile)
    if best is not None:
        prepare_streamed(best.graph)
    if capped:
        notes.append(Note(f"auto: the stream search planned its most ({choice.STREAM_SEARCH_PROBES} configurations); "
                          f"not weighed: {capped} and larger subsets", "auto", "retry"))
    if refused is not None:  # nothing to stream; the plain compile stands, with the reason
        for r in plain.records[:1]:
            r.notes.extend(notes + [refused])
        return _keep(plain)
    rows = [_probe_row(p) for p in probes if p.peak and math.isfinite(p.time_s)]
    if best is None or (plain_fits and best.time_s >= _time(plain)):
        if best is not None:
            release_streamed(best.graph)
        if plain_fits or only_fewbit or lowest is None:
            if lowest is not None:
                release_streamed(lowest.graph)
            for r in plain.records[:1]:
                r.notes.extend(notes)
                r.notes.append(Note(_verdict(probes, None if not plain_fits else best, plain, plain_fits), "auto", "choice"))
                r.candidates.extend(rows)
            return _keep(plain)
        # nothing fits either way: compile the stream plan of lowest peak (the search kept its graph: streaming
        # it again took 17 s of examples/gpt.py's refusal at 35 MiB), and keep the lower of the two
        prepare_streamed(lowest.graph)
        best = lowest
    streamed_gm = best.graph
    streamed = _held(compile_one, backend, streamed_gm, example_inputs,
                     notes + list(streamed_gm.meta.get("memfit_stream_notes", ())))
    if streamed.error is None and streamed.records:
        # the chosen configuration as compiled (the probe planned it without share_norms): its figures
        # are the ones the verdict and its row state, so they agree with the record's own
        peak, t = max(r.analysis.memory.peak_bytes for r in streamed.records), _time(streamed)
        label = _probe_row(best)["label"]
        rows = [dict(r, peak=peak, time_s=t) if r["label"] == label else r for r in rows]
        best = best._replace(peak=peak, time_s=t)
    verdict = Note(_verdict(probes, best, plain, plain_fits), "auto", "choice")
    for r in streamed.records[:1]:
        r.notes.insert(min(len(notes), len(r.notes)), verdict)
    stream_decisions(streamed, streamed_gm)
    kept = None
    try:
        kept = _keep_streamed_or_not(backend, plain, streamed, budget, only_fewbit, plain_fits, rows)
        return kept
    finally:
        if kept is not streamed:  # the plain compile is kept, or neither: no compiled code runs these regions
            release_streamed(streamed_gm)


def _probe_row(p: "StreamProbe") -> dict:
    """The candidates table's row of a stream probe (the report's "combinations compared"): its predicted
    peak and time with the checkpoint plan it needs."""
    return {"label": p.label + " + checkpoint as needed", "peak": p.peak, "time_s": p.time_s, "fits": p.fits,
            "exact": True, "chosen": False, "curve": [], "probe": True}


def _verdict(probes, best, plain: Attempt, plain_fits: bool) -> str:
    fitting = [p for p in probes if p.fits]
    head = f"auto: weighed {len(probes)} stream plan(s), {len(fitting)} fit"
    plain_t = (f"{1e3 * _time(plain):.3f} ms" if plain_fits else
               f"none fits, smallest peak {format_bytes(plain.peak)}" if plain.error is None or plain.peak else "none fits")
    if best is None:
        return f"{head}; without streaming: {plain_t}; compiled without streaming"
    if plain_fits and best.time_s >= _time(plain):
        return (f"{head}; the fastest, {best.label}, is predicted at {1e3 * best.time_s:.3f} ms against "
                f"{plain_t} without streaming: compiled without streaming")
    if not best.fits:
        return (f"{head}; none fits either way: compiled the one of lowest predicted peak, {best.label} "
                f"({format_bytes(best.peak or 0)})")
    return (f"{head}; chose {best.label}, predicted {format_bytes(best.peak or 0)} and {1e3 * best.time_s:.3f} ms "
            f"(without streaming: {plain_t})")


def _label(plan, largest, n) -> str:
    what = "every region" if largest is None or largest >= n else f"the {largest} largest region(s)"
    return (f"stream {what} in " + "/".join(str(r.chunks) for r in plan.regions) + " chunks"
            + (", attentions by query chunks" if any(r.attentions for r in plan.regions) else ""))


def _stream_time(gm, profile) -> float:
    """Predicted time of the stream ops of a streamed graph (forward and backward): a lower bound of its
    step's time, known before the step is planned."""
    from memfit.kernels.stream import REGISTRY

    total = 0.0
    for key in gm.meta.get("memfit_stream_keys", ()):
        r = REGISTRY.get(key)
        if r is not None:
            total += r.time(profile, backward=False) + (0.0 if r.plan.grad_in_forward else r.time(profile, backward=True))
    return total


class StreamSearch(NamedTuple):
    """What :func:`search_streams` found."""

    probes: list  # every configuration weighed (StreamProbe, without graphs)
    best: "StreamProbe | None"  # the fitting probe of least predicted time, with its graph
    refused: Any  # a Note saying why nothing can be streamed, or None
    capped: str | None  # the first configuration left unplanned once choice.STREAM_SEARCH_PROBES were planned
    lowest: "StreamProbe | None"  # where none fits: the probe of lowest predicted peak, with its graph


def search_streams(backend, gm, example_inputs, limit: float, profile=None) -> StreamSearch:
    """Weigh stream configurations of ``gm`` against ``limit`` (the budget less the planning margin).

    Region subsets: the 1, 2, 4, ... largest regions and every region (``choice.stream_subsets``), and,
    only where nothing fits without, every region with attentions by query chunks. Each is tried at its
    most chunks (the planner's default counts times the largest of ``choice.STREAM_CHUNK_MULTIPLIERS``),
    from the smallest subset that fits that way (found by bisection over the subsets where the smallest
    does not fit); where it fits, the fewest chunks that still fit are found by bisection over the
    multipliers (fewer, wider chunks run faster). Every probe is a fake-tensor analysis of the streamed
    step with the checkpoint plan it needs, and a candidate: the least predicted time among those that
    fit wins, whatever its chunk count. A configuration whose stream ops alone, or (once the same regions
    were planned in another chunk count) whose step unplanned, are predicted slower than the best plan so
    far is not planned further (``profile``: the device profile of those predictions). The graphs of the
    best probe, and while none fits of the lowest-peak one, are kept (:class:`StreamSearch`); the others
    are released as soon as they are priced."""
    base = trace_once(gm, example_inputs)
    n = region_count(backend, gm, example_inputs, base)
    if not n:
        got = stream_once(backend, gm, example_inputs, [], 1, None, warn=False)
        if got.graph is gm:
            return StreamSearch([], None, got.notes[-1] if got.notes else Note("stream: nothing to stream", "stream",
                                                                                "nothing_to_do"), None, None)
        release_streamed(got.graph)
        n = 1
    probes: list[StreamProbe] = []
    best: StreamProbe | None = None
    lowest: StreamProbe | None = None  # while none fits: the lowest predicted peak, its graph kept
    seen: dict = {}
    capped: list = []  # configurations left unplanned: the search had planned its most

    asked: dict = {}  # (largest, multiplier, attention) -> its probe: the subset bisection asks again
    joints: dict = {}  # a streamed graph's structure -> its joint graph (see _probe)
    outside: dict = {}  # (largest, attention) -> predicted time of the step outside its stream ops, unplanned

    def probe(largest, mult, attention) -> StreamProbe | None:
        if (largest, mult, attention) not in asked:
            asked[largest, mult, attention] = _probe_once(largest, mult, attention)
        return asked[largest, mult, attention]

    def _probe_once(largest, mult, attention) -> StreamProbe | None:
        nonlocal best, lowest, profile
        got = stream_once(backend, gm, example_inputs, [], mult, largest, attention=attention, warn=False, base=base)
        if got.graph is gm:
            return None
        counts = tuple((r.name, r.chunks, len(r.attentions)) for r in got.plan.regions)
        if counts in seen:  # another multiplier gave these counts already
            release_streamed(got.graph)
            return seen[counts]
        ops = _stream_time(got.graph, profile) if profile is not None else 0.0
        # a lower bound of the step's time: its stream ops, plus (once one chunk count of these regions was
        # planned) the rest of the step unplanned, which the chunk count does not change. On examples/gpt.py
        # at 60 MiB the 2 largest regions in 4 and 8 chunks were planned (3 s each) to be found slower than
        # the LM head alone, which the bound tells at once.
        rest = outside.get((largest, attention))
        floor = ops + (rest if rest is not None else 0.0)
        if best is not None and floor >= best.time_s:
            # no plan of these stream ops can beat the best so far: no need to plan the rest
            release_streamed(got.graph)
            if backend.progress:
                what = "its stream ops alone are" if rest is None else "unplanned, its step is"
                backend.progress(f"stream search: {_label(got.plan, largest, n)}: skipped, {what} "
                                 f"predicted at {1e3 * floor:.2f} ms, the best so far {1e3 * best.time_s:.2f} ms")
            seen[counts] = StreamProbe(_label(got.plan, largest, n), largest, mult, attention, counts, None, floor,
                                       False, skipped=True)
            return seen[counts]
        if sum(1 for q in probes if q.peak is not None or not q.skipped) >= choice.STREAM_SEARCH_PROBES:
            release_streamed(got.graph)
            capped.append(_label(got.plan, largest, n))
            return None
        peak, t, fits, analysed, unplanned = _analyse(backend, got.graph, example_inputs, limit, joints)
        profile = profile or analysed
        if unplanned is not None and profile is not None and (largest, attention) not in outside:
            outside[largest, attention] = max(0.0, unplanned - _stream_time(got.graph, profile))
        label = _label(got.plan, largest, n)
        p = StreamProbe(label, largest, mult, attention, counts, peak, t, fits, got.graph)
        got.graph.meta["memfit_stream_notes"] = [n for n in got.notes]
        if fits and (best is None or t < best.time_s):
            for old in (best, lowest):
                if old is not None:
                    release_streamed(old.graph)
            best, lowest = p, None
        elif best is None and peak and (lowest is None or peak < lowest.peak):
            if lowest is not None:
                release_streamed(lowest.graph)
            lowest = p
        else:
            release_streamed(got.graph)
        probes.append(p._replace(graph=None))
        seen[counts] = probes[-1]
        if backend.progress:
            backend.progress(f"stream search: {label}: " + (
                f"predicted {format_bytes(peak)}, {1e3 * t:.2f} ms, {'fits' if fits else 'over'}" if peak else "no plan fits"))
        return p

    mults = sorted(set(choice.FEWER_CHUNK_FRACTIONS) | set(choice.STREAM_CHUNK_MULTIPLIERS))
    option_cache: dict = {}

    def chunk_options(largest, attention) -> list:
        """The distinct chunk counts the multipliers give (planned, not carried out: cheap), fewest first."""
        if (largest, attention) not in option_cache:
            options: list = []
            for m in mults:
                plan = stream_once(backend, gm, example_inputs, [], m, largest, apply=False, attention=attention,
                                   warn=False, base=base).plan
                counts = plan and tuple((r.name, r.chunks, len(r.attentions)) for r in plan.regions)
                if counts and (not options or options[-1][1] != counts):
                    options.append((m, counts))
            option_cache[largest, attention] = options
        return option_cache[largest, attention]

    subsets = choice.stream_subsets(n)
    top_peak: dict = {}  # subset index -> its predicted peak at its most chunks

    def fits_at_most(i) -> bool:
        """Whether streaming subset ``i`` fits at its most chunks (without chunked attention)."""
        options = chunk_options(subsets[i], False)
        p = probe(subsets[i], options[-1][0], False) if options else None
        if p is not None and p.peak:
            top_peak[i] = p.peak
        return p is not None and (p.fits or p.skipped)

    # The smallest subset that fits at its most chunks, by bisection over the subsets (each a superset of the
    # one before: streaming more regions does not raise the peak), its first step guessed from the peaks of
    # the smallest and the whole subset (interpolated in the number of regions streamed: a transformer's
    # layers each take about as much). The Llama-3-8B config at 20 GiB (LM head alone 24.45 GiB, every
    # region 18.15) guesses the 32 largest (19.98: over), which leaves every region, in one probe of a small
    # graph (7 s); plain bisection asked the 8, 16 and 32 largest, the first two 24-34 s each, as a
    # probe's cost grows with the layers left unstreamed. A subset skipped for time counts as fitting here:
    # the best so far already beats it.
    first = 0
    if len(subsets) > 2 and not fits_at_most(0):
        if fits_at_most(len(subsets) - 1):
            lo, hi = 0, len(subsets) - 1
            mid = _guess_subset(subsets, n, top_peak, limit)
            while hi - lo > 1:
                if fits_at_most(mid):
                    hi = mid
                else:
                    lo = mid
                mid = (lo + hi) // 2
            first = hi
        else:
            first = len(subsets)  # not even every region fits: only attentions by query chunks can help
    configs = [(k, False) for k in subsets[first:]] + [(None, True)]
    for largest, attention in configs:
        if attention and best is not None:
            # attentions by query chunks cost more than the whole causal kernel (stream.md): weighed only where
            # nothing fits without them (each of the Llama-3-8B config's three such configurations took 13 s
            # to trace and price before being skipped for time)
            break
        options = chunk_options(largest, attention)
        if not options:
            continue
        # the fewest chunks that fit, by bisection: the peak falls as chunks are added, the time rises (a
        # probe skipped for its stream ops' time counts as "fewer chunks, please")
        top = probe(largest, options[-1][0], attention)
        if top is None or not (top.fits or top.skipped):
            continue  # it does not fit even at its most chunks
        tried, lo, hi = [top], -1, len(options) - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            p = probe(largest, options[mid][0], attention)
            tried.append(p)
            if p is not None and (p.fits or p.skipped):
                hi = mid
            else:
                lo = mid
        if all(p is None or p.skipped for p in tried):
            break  # more regions only add stream ops: the larger subsets cannot do better
        if capped:
            break
    if best is not None:
        best = next(p for p in probes if p.counts == best.counts)._replace(graph=best.graph)
    if lowest is not None:
        lowest = next(p for p in probes if p.counts == lowest.counts)._replace(graph=lowest.graph)
    if capped and backend.progress:
        backend.progress(f"stream search: stopped after {choice.STREAM_SEARCH_PROBES} plans (choice.STREAM_SEARCH_PROBES); "
                         f"not weighed: {capped[0]} and larger")
    return StreamSearch(probes, best, None, capped[0] if capped else None, lowest)


def _guess_subset(subsets: list, n: int, top_peak: dict, limit: float) -> int:
    """The subset (an index strictly between the first and the last of ``subsets``, both probed) to try
    first in the search for the smallest that fits: where the peak, interpolated linearly in the number of
    regions streamed between the first's and the last's, reaches ``limit``; the middle where a peak is not
    known."""
    lo, hi = 0, len(subsets) - 1
    mid = (lo + hi) // 2
    a, b = top_peak.get(lo), top_peak.get(hi)
    if a is None or b is None or a <= b:
        return mid
    size = [n if k is None else min(k, n) for k in subsets]
    k = size[lo] + (a - limit) / (a - b) * (size[hi] - size[lo])
    return next((i for i in range(lo + 1, hi) if size[i] >= k), hi - 1)


def _structure(gm) -> tuple:
    """A streamed graph up to its regions' keys: its code with each key replaced by its position, and per
    region what shapes the op's autograd (its outputs, which inputs get gradients, gradients in the
    forward or not). Two graphs of one structure (the same regions in other chunk counts) have the same
    joint graph, keys aside."""
    from memfit.kernels.stream import REGISTRY

    keys = list(gm.meta.get("memfit_stream_keys", ()))
    where = {k: i for i, k in enumerate(keys)}
    code = re.sub(r"'(r\d+)'", lambda m: f"<{where.get(m.group(1), m.group(1))}>", gm.code)
    regions = tuple((repr(r.out_meta), r.needs, r.plan.grad_in_forward, repr(r.outputs))
                    for r in (REGISTRY.get(k) for k in keys) if r is not None)
    return code, regions


def _probe(backend, gm, example_inputs, joints: dict | None = None) -> tuple[Attempt | None, BudgetError | None]:
    """(analysis attempt, None) or (None, its refusal) of an already streamed graph's step, for a search
    that then drops it: its warnings muted (a probe's "over the budget" is not the final word), no report
    curve (never shown), no share-norms rewrite (:attr:`Attempt.probe`). ``joints``: a search's joint
    graphs by :func:`_structure`; a graph of a structure seen before is planned from that one's joint
    graph, not traced again (:meth:`Attempt.partition_again`)."""
    curve, backend.curve_points = backend.curve_points, 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if joints is None:
                return compile_analysis(backend, gm, example_inputs, [], probe=True), None
            structure = _structure(gm)
            keys = list(gm.meta.get("memfit_stream_keys", ()))
            seen = joints.get(structure)
            if seen is None:
                def remember(snap):
                    joints[structure] = (snap, keys)
                return compile_analysis(backend, gm, example_inputs, [], probe=True, remember=remember), None
            snap, old = seen
            attempt = Attempt(backend, [], probe=True)
            attempt.partition_again(snap, dict(zip(old, keys)))
            return attempt, None
    except BudgetError as e:
        return None, e
    finally:
        backend.curve_points = curve


def _analyse(backend, gm, example_inputs, limit: float, joints: dict | None = None):
    """(predicted peak or None, predicted time, fits exactly under ``limit``, the device profile or None,
    the step's predicted time unplanned or None) of a streamed graph's step, from an analysis attempt that
    is then dropped. The unplanned time (the baseline partition's, no recomputation) bounds from below
    what the same regions streamed in other chunk counts can take (see :func:`search_streams`)."""
    probe, refused = _probe(backend, gm, example_inputs, joints)
    if refused is not None:  # strict: no plan fits; its smallest peak still ranks the configurations
        unplanned = refused.baseline[1].time_s if getattr(refused, "baseline", None) is not None else None
        return (refused.smallest_peak or None), float("inf"), False, None, unplanned
    if not probe.records:
        return None, float("inf"), False, None, None
    peak = max(r.analysis.memory.peak_bytes for r in probe.records)
    exact = all(r.fewbit is None for r in probe.records)
    fits = not probe.infeasible and exact and peak <= limit
    return peak, _time(probe), fits, probe.records[0].analysis.profile, _unchanged_time(probe) if exact else None


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


def _keep_streamed_or_not(backend, plain: Attempt, streamed: Attempt, budget: int, only_fewbit: bool,
                          plain_fits: bool = False, probe_rows: list = ()) -> Attempt:
    """Of the two compiles, keep the streamed one if it fits exactly; else the plain one if it does;
    else the lower peak (or the fitting few-bit one); with ``strict``, refuse when neither fits."""
    for r in streamed.records:  # what the report and the candidates table call the choice
        r.partition = f"stream + {r.partition}"
        for c in r.candidates:
            c["label"] = f"stream + {c['label']}"
    for r in (streamed.records or plain.records)[:1]:
        if streamed.records:
            # what it was weighed against: the plan without streaming (none chosen)
            r.candidates.extend(dict(c, label=f"without streaming: {c['label']}", chosen=False, curve=[])
                                for p in plain.records[:1] for c in p.candidates)
        r.candidates.extend(probe_rows)
    _plain_before(plain, streamed)
    # a compiled step's peak is its replayed buffer plan, stream ops' chunk scratch included: held to the
    # budget itself, as the plain compile is (the margin is for planning on the FX-level model)
    if _fits_exactly(streamed, budget):
        return _keep(streamed)
    if plain_fits:
        for r in plain.records[:1]:
            r.notes.append(Note(f"auto: the stream plan compiled over the budget ({format_bytes(streamed.peak)}); "
                                "compiled without streaming", "auto", "choice"))
        return _keep(plain)
    if only_fewbit:
        kept, other = plain, streamed
    else:
        kept, other = (streamed, plain) if choice.keep_streamed(streamed.peak, plain.peak) else (plain, streamed)
        if backend.strict:
            # a streamed compile refused by the planner states its FX-level peak, planned with the margin; one
            # compiled (and over the budget) states its replayed peak, which needs none
            s_margin = streamed.error.margin if streamed.error is not None else 1.0
            if streamed.peak / s_margin < plain.peak:
                why = " (planned with the margin for what the FX-level model misses under Inductor)" if s_margin < 1 else ""
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
        if kept is streamed and not kept.infeasible and kept.peak > budget:  # strict=False: say so
            err = BudgetError(kept.peak, budget, hints=backend.hints(kept.peak))
            r.notes.append(Note(f"does not fit: {str(err).splitlines()[0]}", None, "kept_smallest"))
            kept.infeasible.append(str(err))
    return _keep(kept)


# -- the stream pass and its chunk search ---------------------------------------------------------
def prepare_streamed(gm) -> None:
    """Trace the chunk graphs of a streamed graph's regions that a search priced from a twin: the graph
    is to be compiled and run."""
    from memfit.kernels.stream import REGISTRY

    for key in gm.meta.get("memfit_stream_keys", ()):
        r = REGISTRY.get(key)
        if r is not None:
            r.ensure_prepared()


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
    step is over the budget (less the planning margin: under Inductor the FX-level model can miss what
    Inductor's buffer plan then shows): the n largest regions, then every region, then
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
    probe, refused = _probe(backend, gm, example_inputs)
    if refused is not None or not probe.records:
        return None
    return probe.records[-1].analysis.memory.peak_bytes


def region_count(backend, gm, example_inputs, base: Traced | None = None) -> int:
    """How many regions the stream planner finds in ``gm`` at its default counts (0: none)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the real attempt says why, once
        got = stream_once(backend, gm, example_inputs, [], 1, None, apply=False, base=base)
    return len(got.plan.regions) if got.plan is not None else 0


class Traced(NamedTuple):
    """``gm`` traced to ATen once, for a search's many stream plans (:func:`stream_once` plans and carries
    out each on a copy: the trace took 0.46 s of each of examples/gpt.py's probes)."""

    graph: torch.fx.GraphModule


def trace_once(gm, example_inputs) -> Traced | None:
    """The ATen trace :func:`stream_once` would make, for ``base=`` (None: the graph cannot be streamed;
    ``stream_once`` without a base says why)."""
    from memfit.passes import stream as sp

    try:
        _check_streamable(gm, example_inputs)
        return Traced(sp.to_aten(gm, example_inputs))
    except Exception:  # noqa: BLE001 - stream_once traces again and reports the failure as it always has
        return None


def _copy(traced: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy the stream pass may rewrite: its own graph and nodes (each node's ``meta`` a copy of the
    original's; the example values themselves are shared, and never written)."""
    import copy

    g = torch.fx.GraphModule(traced, copy.deepcopy(traced.graph))
    g.meta = {}
    return g


def _check_streamable(gm, example_inputs) -> None:
    """Raise ``CantApply`` where ``gm``'s sizes are not known before the step runs: the stream pass cuts a
    graph of known sizes into chunks."""
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


def stream_once(backend, gm, example_inputs, notes, multiplier: float, largest: int | None = None,
                apply: bool = True, attention: bool = False, warn: bool = True, base: Traced | None = None) -> _Streamed:
    """Plan the stream pass for ``gm`` (the ``largest`` regions, chunk counts times ``multiplier``,
    attentions by query chunks or not) and carry the plan out on an ATen copy of ``gm`` (a copy of
    ``base``, its trace, where given). A refusal is a note, and a warning when ``warn`` (the user named
    the pass)."""
    from memfit.passes import stream as sp
    from memfit.planner.stream import plan_stream

    notes = list(notes)
    try:
        _check_streamable(gm, example_inputs)
        traced = sp.to_aten(gm, example_inputs) if base is None else _copy(base.graph) if apply else base.graph
        need = sp.needs_grad(traced, example_inputs)  # of this copy's nodes (a linear pass)
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
    "search_streams",
    "stream_or_not",
]
