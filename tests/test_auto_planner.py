"""passes="auto": one planner choosing among the passes per graph; budget semantics; infeasible budgets.

Numerics: the exact choice gives eager's gradients. Structure: the candidates compared and the one chosen,
by the rule (least predicted time among those that fit, exact preferred within 2%). Effect: the measured
peak is under the budget (+2%), and device_memory subtracts exactly the resident bytes.
"""

from __future__ import annotations

import copy

import pytest
import torch

import memfit
from helpers import build, loss_and_grads
from memfit import BudgetError
from memfit.config import make_options
from memfit.measurement import measure, training_step
from memfit.planner import choice
from memfit.planner.budget import OPTIMIZER_STATES, step_budget


def _mlp(batch=256, width=128, depth=4):
    import mlp

    return mlp.factory(batch=batch, width=width, depth=depth)


def _peak_unplanned(model, inputs, inner="eager"):
    be = memfit.backend(passes=[], inner=inner)
    torch.compile(copy.deepcopy(model), backend=be)(*inputs).backward()
    return be.records[-1].analysis.memory.peak_bytes


def test_options_validate_budget_semantics():
    with pytest.raises(ValueError, match="either budget= .* or device_memory="):
        make_options(budget="1GiB", device_memory="80GB")
    with pytest.raises(ValueError, match="unknown optimizer 'adamx'; accepted: .*adamw"):
        make_options(device_memory="80GB", optimizer="adamx")
    with pytest.raises(ValueError, match="allow_approximation=1 must be True or False"):
        make_options(allow_approximation=1)
    assert make_options(device_memory="80GB", optimizer="AdamW").optimizer == "adamw"


def test_step_budget_subtracts_parameters_and_optimizer_state():
    sb = step_budget(budget=None, device_memory=80 * 10**9, param_bytes=16 * 2**30, optimizer="adamw")
    assert sb.budget == 80 * 10**9 - 3 * 16 * 2**30
    assert sb.resident_bytes == 3 * 16 * 2**30 and OPTIMIZER_STATES["adamw"] == 2
    assert "16.00 GiB parameters" in sb.describe() and "32.00 GiB adamw state" in sb.describe()
    none = step_budget(budget=None, device_memory=2**30, param_bytes=2**20, optimizer=None)
    assert none.budget == 2**30 - 2**20 and "none counted" in none.describe()
    assert step_budget(budget=123, device_memory=None, param_bytes=5, optimizer="adamw").budget == 123


def test_device_memory_budget_in_the_backend_and_resident_too_large():
    model, inputs = _mlp()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    step = _peak_unplanned(model, inputs)
    want = int(0.8 * step)
    be = memfit.backend(device_memory=3 * params + want, optimizer="adam", inner="eager")
    torch.compile(model, backend=be)(*inputs).backward()
    rec = be.records[-1]
    assert rec.budget.budget == want  # exactly what the device leaves after params + 2 Adam states
    assert rec.plan is not None and rec.analysis.memory.peak_bytes <= want
    with pytest.raises(BudgetError, match="already fills the device memory"):
        torch._dynamo.reset()
        be2 = memfit.backend(device_memory=2 * params, optimizer="adamw", inner="eager")
        torch.compile(copy.deepcopy(model), backend=be2)(*inputs)


def test_auto_without_approximation_is_exact_and_matches_eager():
    model, args, kwargs = build("gpt")
    peak = _peak_unplanned(model, args)
    be = memfit.backend(budget=int(0.7 * peak), inner="eager")
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend=be)
    loss_ref, grads_ref = loss_and_grads(ref, args, kwargs)
    loss, grads = loss_and_grads(compiled, args, kwargs)
    torch.testing.assert_close(loss, loss_ref, rtol=1.3e-6, atol=1e-5)
    for k in grads_ref:
        torch.testing.assert_close(grads[k], grads_ref[k], rtol=1.3e-6, atol=1e-5)
    rec = be.records[-1]
    own = [c for c in rec.candidates if not c.get("probe")]
    labels = [c["label"] for c in own]
    # few-bit is not even evaluated without permission; the exact share_norms is, and the checkpoint plan
    # is made on the graph with shared norms
    assert labels == ["unchanged", "share_norms", "share_norms + checkpoint"]
    assert rec.fewbit is None and rec.plan is not None and [c["chosen"] for c in own] == [False, False, True]
    # the plan recomputes, so stream plans were weighed too, by time: none fitting was predicted faster
    probes = [c for c in rec.candidates if c.get("probe")]
    assert probes and all(c["label"].startswith("stream ") for c in probes)
    assert all(c["time_s"] >= own[-1]["time_s"] for c in probes if c["fits"])
    assert any("weighed" in str(n) for n in rec.notes)
    assert not any(d["technique"] == "fewbit" for d in rec.decisions)


def _chosen_by_rule(cands):
    fits = [c for c in cands if c["fits"]]
    exact = min((c for c in fits if c["exact"]), key=lambda c: c["time_s"], default=None)
    approx = min((c for c in fits if not c["exact"]), key=lambda c: c["time_s"], default=None)
    if exact is not None and (approx is None or exact["time_s"] <= 1.02 * approx["time_s"]):
        return exact
    return approx


@pytest.mark.parametrize(
    "fraction, device, expect_exact",
    [
        (0.85, "cpu", True),  # on CPU the few-bit ops run their torch reference: slow, never chosen
        (0.65, "cpu", True),
        (0.8, "h100", True),  # few-bit predicted faster, but by less than 2%: exact preferred
        (0.7, "h100", False),  # checkpointing recomputes more than the few-bit codes cost
    ],
)
def test_auto_with_approximation_chooses_least_predicted_time_that_fits(fraction, device, expect_exact):
    model, inputs = _mlp(batch=512, width=256, depth=4)
    peak = _peak_unplanned(model, inputs)
    budget = int(fraction * peak)
    be = memfit.backend(budget=budget, inner="eager", allow_approximation=True, device=device)
    compiled = torch.compile(model, backend=be)
    m = measure(training_step(compiled, inputs), repeat=1, warmup=1)
    rec = be.records[-1]
    cands = rec.candidates
    labels = [c["label"] for c in cands]
    assert labels[0] == "unchanged" and any(lbl.endswith("checkpoint") for lbl in labels), labels
    assert any("fewbit" in lbl for lbl in labels), labels  # approximation was considered
    chosen = [c for c in cands if c["chosen"]]
    assert len(chosen) == 1 and chosen[0] is _chosen_by_rule(cands)
    assert chosen[0]["fits"] and chosen[0]["peak"] <= budget
    assert m.peak_bytes <= 1.02 * budget  # measured, eager inner: the model is exact there
    assert chosen[0]["exact"] == expect_exact
    if not chosen[0]["exact"]:
        assert rec.fewbit is not None and any("approximate" in n for n in rec.notes)
        assert any(d["technique"] == "fewbit" for d in rec.decisions)


def test_infeasible_budget_names_the_smallest_peak_and_what_would_help():
    model, args, kwargs = build("gpt")
    be = memfit.backend(budget=1024, inner="eager")
    with pytest.raises(BudgetError) as e:
        torch.compile(model, backend=be)(*args)
    msg = str(e.value)
    assert f"({e.value.smallest_peak} bytes)" in msg and e.value.smallest_peak > 1024
    assert "allow approximation" in msg and "pipeline stages" in msg


def test_non_strict_keeps_the_smallest_peak_plan_and_says_why():
    model, args, kwargs = build("gpt")
    be = memfit.backend(budget=1024, inner="eager")
    be.strict = False
    torch.compile(model, backend=be)(*args).backward()
    rec = be.records[-1]
    assert be.infeasible and "no plan fits the budget" in be.infeasible[0]
    smallest = min(c["peak"] for c in rec.candidates if not c.get("probe"))  # probes: the stream search's rows
    assert rec.analysis.memory.peak_bytes == smallest
    assert any(n.startswith("does not fit") for n in rec.notes)


def test_auto_streams_only_where_no_exact_plan_fits_without_it():
    """A GPT whose [tokens, vocab] logits are the floor of every checkpoint plan: at a budget under
    that floor, ``passes="auto"`` streams the token-wise regions (the logits never exist whole),
    matches eager, and the measured peak fits; at a budget checkpointing meets, it does not stream."""
    import gpt

    model, (idx, tgt) = gpt.factory(batch=1, seq=512, block_size=512, vocab_size=8192, n_layer=2, n_head=4, n_embd=64)
    tgt[0, :7] = -1  # ignored targets
    with pytest.raises(BudgetError) as e:
        torch.compile(copy.deepcopy(model), backend=memfit.backend(passes=["checkpoint"], budget=1, inner="eager"))(idx, tgt)
    floor = e.value.smallest_peak  # checkpointing's smallest peak: the logits and their gradient
    budget = int(floor * 0.8)
    torch._dynamo.reset()
    be = memfit.backend(budget=budget, inner="eager")
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend=be)
    loss_ref, grads_ref = loss_and_grads(ref, (idx, tgt), {})
    loss, grads = loss_and_grads(compiled, (idx, tgt), {})
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    for k in grads_ref:
        torch.testing.assert_close(grads[k], grads_ref[k], rtol=1e-5, atol=1e-6)
    rec = be.records[-1]
    stream_ops = [n for n in rec.pair.forward.graph.nodes if n.target is torch.ops.memfit.stream.default]
    assert stream_ops and any("auto: no plan fits without streaming" in n for n in rec.notes), rec.notes
    own = [c for c in rec.candidates if not c.get("probe")]
    assert rec.partition.startswith("stream + ") and all(c["label"].startswith("stream + ") for c in own)
    assert not be.infeasible and rec.analysis.memory.peak_bytes <= budget
    assert [r.name for r in be.records] == ["g0"]  # the search's probes take no names (was g9)
    m = measure(training_step(compiled, (idx, tgt)), repeat=1)
    assert m.peak_bytes <= budget * 1.02, (m.peak_bytes, budget)

    # at a budget checkpointing meets, streaming is weighed against it by predicted time, not taken first
    torch._dynamo.reset()
    assert floor * 1.05 < _peak_unplanned(model, (idx, tgt))
    be = memfit.backend(budget=int(floor * 1.05), inner="eager")
    torch.compile(copy.deepcopy(model), backend=be)(idx, tgt).backward()
    rec = be.records[-1]
    streamed = any(n.target is torch.ops.memfit.stream.default for n in rec.pair.forward.graph.nodes)
    verdict = next((n for n in rec.notes if "stream plan(s)" in str(n)), None)
    chosen = next(c for c in rec.candidates if c["chosen"])
    if verdict is None:  # recomputation cheaper than any stream plan could be: not searched
        assert not streamed and rec.plan is not None
        assert chosen["time_s"] <= rec.before.time_s * choice.STREAM_SEARCH_FROM
    else:
        probes = [c for c in rec.candidates if c.get("probe") and c["fits"]]
        assert probes and all(c["time_s"] >= chosen["time_s"] * 0.999 for c in probes), (chosen, probes)
        assert ("chose stream" in str(verdict)) == streamed and (streamed or rec.plan is not None), verdict


def test_auto_does_not_warn_about_a_stream_pass_nobody_named():
    """``passes="auto"`` weighs streaming where the plan without it recomputes; on a model with nothing to stream the
    refusal is a note in the record (and the report), not a warning for a pass the user never named."""
    import warnings

    model, inputs = _mlp(batch=64, width=64, depth=2)
    be = memfit.backend(budget=1024, inner="eager")
    be.strict = False  # keep the smallest-peak plan and its notes instead of raising
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(model, backend=be)(*inputs).backward()
    assert not [w for w in caught if "stream pass not applied" in str(w.message)], [str(w.message) for w in caught]
    (rec,) = be.records
    assert any(n.startswith("stream: not applied: no integer [batch, seq] input") for n in rec.notes), rec.notes
    assert be.infeasible  # and the budget is not met: said, not hidden


@pytest.mark.floor_check
def test_a_budget_below_the_floor_is_refused_before_any_planning(tmp_path, monkeypatch):
    """A budget under what the step needs whatever the plan (its parameters' gradients, its largest op)
    is refused from the Dynamo graph alone: no checkpoint program, no stream search (a 1-byte budget
    took 60 s to refuse on examples/gpt.py). The floor is a true lower bound of the planner's smallest
    peak, and the report says "needs at least", not "smallest reachable"."""
    import json

    from memfit.compiler import search
    from memfit.planner import checkpoint, choice

    model, args, kwargs = build("gpt")
    grads = sum(p.numel() * p.element_size() for p in model.parameters())

    def searched(*a, **k):
        raise AssertionError("a plan was searched for a budget below the floor")

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "plan", searched)
        m.setattr(search, "search_streams", searched)
        path = tmp_path / "r.md"
        be = memfit.backend(budget=1024, inner="eager", report=str(path))
        with pytest.raises(BudgetError) as e:
            torch.compile(copy.deepcopy(model), backend=be)(*args)
    err = e.value
    assert err.at_least and err.budget == 1024 and err.smallest_peak >= grads
    assert "at the very least" in str(err) and "gradients" in str(err) and "none was searched" in str(err)
    assert "needs at least" in path.read_text() and "no plan was searched" in path.read_text()
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["fits"] is False and data["at_least"] and data["smallest_peak"] == err.smallest_peak

    # the floor is below what the planner can reach (searched now), and below the measured unplanned step
    torch._dynamo.reset()
    monkeypatch.setattr(choice, "REFUSE_BELOW_FLOOR", False)
    with pytest.raises(BudgetError) as searched_err:
        torch.compile(copy.deepcopy(model), backend=memfit.backend(budget=1024, inner="eager"))(*args)
    assert not searched_err.value.at_least and searched_err.value.smallest_peak >= err.smallest_peak
    assert _peak_unplanned(model, args) >= err.smallest_peak
    # and just above the floor the search runs as before (refused with the smallest reachable peak)
    torch._dynamo.reset()
    monkeypatch.setattr(choice, "REFUSE_BELOW_FLOOR", True)
    with pytest.raises(BudgetError) as above:
        torch.compile(copy.deepcopy(model), backend=memfit.backend(budget=err.smallest_peak, inner="eager"))(*args)
    assert not above.value.at_least and above.value.smallest_peak == searched_err.value.smallest_peak


def test_the_stream_search_traces_each_structure_once_and_keeps_what_it_compiles(monkeypatch):
    """The stream search plans a region subset in several chunk counts; only the first is traced through
    AOTAutograd (joint graph, joint passes, min-cut baseline), the others are planned from its joint graph
    with the stream ops' keys renamed (``Attempt.partition_again``). Numerics: each such probe's predicted
    peak, time, baseline and checkpoint plan equal those of the same graph traced afresh. Structure: one
    trace per distinct structure. Effect: fewer traces than probes planned. Where nothing fits, the
    probe of lowest peak is compiled from the graph the search kept (streaming it again took 17 s of
    examples/gpt.py's refusal at 35 MiB), its regions prepared to run."""
    import sys
    import warnings

    from memfit.compiler import search
    from memfit.compiler.attempt import Attempt
    from memfit.trace import trace_step

    sys.path.insert(0, "examples")
    import gpt

    def factory():
        return gpt.factory(batch=2, seq=128, vocab_size=2048, block_size=128, n_layer=2, n_head=4, n_embd=32)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = trace_step(factory)[0].records[0].analysis.memory.peak_bytes
    probe, traced, again, compared = search._probe, [], [], []
    partition_again = Attempt.partition_again

    def counting_again(self, snap, keys):
        again.append(keys)
        return partition_again(self, snap, keys)

    def checked(backend, gm, example_inputs, joints=None):
        structure = search._structure(gm) if joints is not None else None
        seen = joints is not None and structure in joints
        if joints is not None and not seen:
            traced.append(structure)
        got = probe(backend, gm, example_inputs, joints)
        if seen:  # the same graph traced afresh plans the same
            fresh = probe(backend, gm, example_inputs, {})
            compared.append((got, fresh))
        return got

    monkeypatch.setattr(search, "_probe", checked)
    monkeypatch.setattr(Attempt, "partition_again", counting_again)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        be, _ = trace_step(factory, budget=int(plain * 0.5), strict=False)
    probes = [c for c in be.records[0].candidates if c.get("probe")]
    assert compared and len(again) == len(compared)
    assert len(traced) == len(set(traced)) and len(traced) + len(compared) == len(probes), (len(traced), probes)
    for (got, _), (fresh, _) in compared:
        (a,), (b,) = got.records, fresh.records
        assert a.analysis.memory.peak_bytes == b.analysis.memory.peak_bytes
        assert a.analysis.time_s == pytest.approx(b.analysis.time_s, rel=1e-12)
        assert a.before.memory.peak_bytes == b.before.memory.peak_bytes
        assert (a.plan and a.plan.saved) == (b.plan and b.plan.saved)
        assert len(a.pair.backward.graph.nodes) == len(b.pair.backward.graph.nodes)

    # nothing fits: the lowest-peak probe's graph is compiled as the search left it, not streamed again
    from memfit.kernels.stream import REGISTRY

    monkeypatch.setattr(search, "_probe", probe)
    search_streams, stream_once, after = search.search_streams, search.stream_once, []

    def searched(*a, **k):
        got = search_streams(*a, **k)
        after.append(got.lowest)
        return got

    monkeypatch.setattr(search, "search_streams", searched)
    # streamed again once the search returned (inside it, stream_once plans and carries out every probe)
    monkeypatch.setattr(search, "stream_once", lambda *a, **k: (after and after.append("again")) or stream_once(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        be, _ = trace_step(factory, budget=int(plain * 0.3), strict=False)
    (rec,) = be.records
    lowest = after[0]
    assert after == [lowest] and lowest is not None and be.infeasible
    assert any("none fits either way: compiled the one of lowest predicted peak" in n for n in rec.notes), rec.notes
    keys = lowest.graph.meta["memfit_stream_keys"]
    ops = {n.args[0] for n in rec.pair.forward.graph.nodes if n.target is torch.ops.memfit.stream.default}
    assert ops == set(keys) and all(REGISTRY[k].twin is None and (REGISTRY[k].fwd or REGISTRY[k].fwdbwd) for k in keys)


def test_the_subset_search_first_guesses_from_the_peaks_at_its_ends():
    """The smallest region subset that fits is bisected from a first guess interpolated between the peaks of
    the smallest and the whole subset: the Llama-3-8B config at 20 GiB (LM head alone 24.45 GiB, every
    region 18.15, limit 19.40) guesses the 32 largest regions, next to every region, where the middle (the 8
    largest) was a 24-34 s probe of a graph with 25 layers unstreamed."""
    from memfit.compiler.search import _guess_subset

    subsets = choice.stream_subsets(33)
    assert subsets == [1, 2, 4, 8, 16, 32, None]
    gib = 2**30
    ends = {0: 24.45 * gib, 6: 18.15 * gib}
    assert subsets[_guess_subset(subsets, 33, ends, 19.40 * gib)] == 32
    assert subsets[_guess_subset(subsets, 33, ends, 24.00 * gib)] == 4  # 3.3 regions: the 4 largest
    assert subsets[_guess_subset(subsets, 33, ends, 18.20 * gib)] == 32  # never the ends themselves
    # a peak unknown (a probe skipped for time), or not falling: the middle
    assert _guess_subset(subsets, 33, {0: ends[0]}, 19.40 * gib) == 3
    assert _guess_subset(subsets, 33, {0: 5.0, 6: 5.0}, 1.0) == 3
