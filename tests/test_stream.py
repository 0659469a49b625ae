"""The stream pass: token-wise regions run in chunks along the sequence.

Numerics: loss and every gradient equal the unstreamed step's (1e-5 relative, fp32) on a nanoGPT-style
GPT, HF Llama and HF GPT-2, with padding and ignore_index labels, under both inner compilers.
Structure: the expected stream ops are in the graphs, each region ran exactly its chunk count, regions
end at attention / random / rule-less ops with the reason in the notes.
Effect: the measured peak drops by the logits the LM head no longer materialises, and the predicted
peak (chunk scratch included) follows the measured one.
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch

import memfit
from memfit import BudgetError
from memfit.measurement import measure, training_step
from memfit.passes import stream as sp
from memfit.planner.stream import Tok, analyse, find_regions, seq_len_of

aten = torch.ops.aten


def _grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def _assert_close(got, ref, rtol=1e-5, zero=()):
    """Loss and every gradient within ``rtol`` of the largest entry. ``zero``: gradients that are zero in
    exact arithmetic (a key projection's bias: softmax ignores a shift shared by a row's scores), whose
    entries are rounding noise on both sides; they must stay below 1e-6 of the step's largest gradient."""
    (l1, g1), (l0, g0) = got, ref
    torch.testing.assert_close(l1, l0, rtol=rtol, atol=0)
    assert g1.keys() == g0.keys() and g0
    scale = max(g.abs().max() for g in g0.values())
    for k in g0:
        if any(z in k for z in zero):
            assert max(g0[k].abs().max(), g1[k].abs().max()) <= 1e-6 * scale, k
            continue
        err = (g1[k] - g0[k]).abs().max() / g0[k].abs().max().clamp_min(1e-30)
        assert err <= rtol, f"grad of {k}: max error {err:.2e} of its largest entry"


def _ops(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def _regions(be):
    keys = [n.args[0] for r in be.records for n in _ops(r.pair.forward, torch.ops.memfit.stream.default)]
    return [sp.REGISTRY[k] for k in keys]


def _gpt(**kw):
    import gpt

    cfg = dict(batch=2, seq=64, vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=64)
    cfg.update(kw)
    model, (idx, tgt) = gpt.factory(**cfg)
    tgt[0, :5] = -1  # ignore_index of the nanoGPT loss
    return model, idx, tgt


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_gpt_matches_unstreamed_and_runs_each_region_in_chunks(inner):
    model, idx, tgt = _gpt()
    ref = _grads(model, lambda: model(idx, tgt))
    be = memfit.backend(passes=["stream"], inner=inner, stream_chunks=4, stream_attention=True)
    compiled = torch.compile(model, backend=be)
    _assert_close(_grads(model, lambda: compiled(idx, tgt)), ref)

    # structure: three regions (embedding..layer-0 qkv, layer-0 attention..layer-1 qkv, layer-1
    # attention..loss): each causal attention runs by query chunks inside the region after its K/V;
    # the last region is the loss, its backward ran in the forward
    (rec,) = be.records
    regions = _regions(be)
    assert len(regions) == 3
    assert [r.plan.grad_in_forward for r in regions] == [False, False, True]
    assert len(_ops(rec.pair.backward, torch.ops.memfit.stream_backward.default)) == 2
    assert not _ops(rec.pair.forward, torch.ops.aten._log_softmax.default)  # the logits live in the op only
    assert not _ops(rec.pair.forward, torch.ops.aten.mm.default) and not _ops(rec.pair.forward, torch.ops.aten.addmm.default)
    # each region ran 4 chunks in the forward, and the two recomputed ones 4 more in the backward
    assert [r.chunk_runs for r in regions] == [8, 8, 4]
    attn = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    assert not _ops(rec.pair.forward, attn)  # no whole-sequence attention left in the graph
    assert [sum(n.target is attn for n in r.body.graph.nodes) for r in regions] == [0, 1, 1]
    k_in = [lay for lay in regions[1].input_layouts if lay is not None and lay.prefix]
    assert len(k_in) == 2  # K and V: each chunk reads their prefix, and adds to their gradient there
    assert any("region s2" in n and "4 chunks" in n for n in rec.notes)
    # under Inductor a region's chunk graphs are compiled too (fused), except where a causal attention
    # needs one graph per prefix length: one compile for the first region's forward and one for its backward
    assert [r.plan.fused for r in regions] == [inner == "inductor", False, False]
    assert [sorted(k for k, _ in r.compiled) for r in regions] == [["bwd", "fwd"] if inner == "inductor" else [], [], []]


def test_repeated_layers_are_priced_from_one_twin_and_traced_before_they_run():
    """Inside ``twin_pricing`` (the auto search's probes) a region of a structure already prepared takes its
    scratch and time without tracing its own chunk graphs; such a region refuses to run until
    ``ensure_prepared``, which copies the twin's chunk graphs (no tracing), after which the step is exact and
    the figures are its own, equal to the twin's."""
    from memfit.kernels import stream as ks

    model, idx, tgt = _gpt(n_layer=4)
    ref = _grads(model, lambda: model(idx, tgt))
    be = memfit.backend(passes=["stream"], inner="eager", stream_chunks=4, stream_attention=False)
    compiled = torch.compile(model, backend=be)
    with ks.twin_pricing():
        with pytest.raises(RuntimeError, match="priced from a twin"):
            compiled(idx, tgt)
    regions = _regions(be)
    # structure: embedding..layer-0 QKV, three layer-to-layer regions of one structure, the LM head and loss
    assert len(regions) == 5
    twins = [r for r in regions if r.twin is not None]
    assert len(twins) == 2 and all(r.twin is regions[1] for r in twins)
    assert all(not r.fwd and not r.bwd for r in twins)  # nothing traced for them
    assert len({r.signature() for r in regions}) == 3
    profile = be.records[0].analysis.profile
    priced = [(r.scratch_fwd, r.scratch_bwd, r.time(profile, False), r.time(profile, True)) for r in twins]
    traces = []
    make_fx = ks.make_fx
    ks.make_fx = lambda *a, **k: traces.append(a) or make_fx(*a, **k)
    try:
        for r in regions:
            r.ensure_prepared()
    finally:
        ks.make_fx = make_fx
    assert all(r.twin is None and r.fwd and r.bwd for r in twins)
    # the twin's graphs are copied, not traced again, and not shared (each region compiles its own)
    assert traces == []
    assert all(r.fwd.keys() == regions[1].fwd.keys() and all(r.fwd[k] is not regions[1].fwd[k] for k in r.fwd)
               for r in twins)
    # effect: the twin's figures are the ones its own chunk graphs give
    own = [(r.scratch_fwd, r.scratch_bwd, r.time(profile, False), r.time(profile, True)) for r in twins]
    assert own == pytest.approx(priced, rel=1e-12)
    _assert_close(_grads(model, lambda: compiled(idx, tgt)), ref)


def test_uneven_last_chunk_and_merged_batch_rows():
    """60 tokens in 8 chunks (the last has 4); batch 3 makes the LM head see [B*T, d] rows (outer=3)."""
    model, idx, tgt = _gpt(batch=3, seq=60, block_size=60)
    ref = _grads(model, lambda: model(idx, tgt))
    be = memfit.backend(passes=["stream"], inner="eager", stream_chunks=8, stream_attention=True)
    compiled = torch.compile(model, backend=be)
    _assert_close(_grads(model, lambda: compiled(idx, tgt)), ref)
    assert sorted({e - s for s, e in _regions(be)[0].ranges()}) == [4, 8]
    # the attention's chunk graphs exist per prefix length: 8 chunks, 8 distinct (length, end) keys
    assert len(_regions(be)[1].fwd) == 8


def _hf_batch(vocab):
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (2, 64))
    mask = torch.ones_like(ids)
    mask[1, -10:] = 0  # right padding
    labels = ids.clone()
    labels[1, -10:] = -100
    labels[0, :7] = -100  # a masked prompt
    return ids, mask, labels


@pytest.mark.parametrize("arch,padding,inner", [("llama", True, "eager"), ("gpt2", True, "eager"), ("gpt2", False, "inductor")])
def test_hf_models_with_padding_and_ignore_index(arch, padding, inner):
    if arch == "llama":
        import hf_llama

        model, _ = hf_llama.factory(batch=2, seq=64, vocab_size=1024, hidden_size=64, intermediate_size=172,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=1024, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                         attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        model = GPT2LMHeadModel(cfg)
    ids, mask, labels = _hf_batch(1024)
    if not padding:
        mask = None  # GPT-2 then calls SDPA with is_causal=True: streamed by query chunks

    def step(ids, mask, labels):
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    ref = _grads(model, lambda: step(ids, mask, labels))
    be = memfit.backend(passes=["stream"], inner=inner, stream_chunks=4, stream_attention=True)
    compiled = torch.compile(step, backend=be)
    _assert_close(_grads(model, lambda: compiled(ids, mask, labels)), ref)
    regions = _regions(be)
    assert len(regions) >= 3
    assert all(r.chunk_runs >= 4 for r in regions)
    notes = " ".join(n for r in be.records for n in r.notes)
    attn = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    streamed = sum(n.target is attn for r in regions for n in r.body.graph.nodes)
    assert streamed == 2  # both layers' attentions run by query chunks, with padding too
    # HF's padding mask is ``causal & padding``: proven causal, so each chunk reads only its prefix
    assert {mode for r in regions for _, mode in r.plan.attentions} == {"prefix"}
    assert "explicit mask" not in notes
    masks = [lay for r in regions for name, lay in zip(r.plan.inputs, r.input_layouts)
             if any(n.name == name and any(u.kwargs.get("attn_mask") is n for u in n.users) for n in r.body.graph.nodes)]
    if padding:  # the [B, 1, T, T] mask is an input of both attention regions, sliced by query rows
        assert masks == [Tok(2), Tok(2)]
    else:
        assert masks == []


def test_bert_with_padding_streams_attention_against_all_keys():
    """A bidirectional attention (BERT's, with its padding mask) runs by query chunks against all keys:
    the mask's query rows are sliced per chunk, dK and dV are summed over the chunks."""
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                     max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = BertForMaskedLM(cfg)
    ids, mask, labels = _hf_batch(1024)

    def step(ids, mask, labels):
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    ref = _grads(model, lambda: step(ids, mask, labels))
    be = memfit.backend(passes=["stream"], inner="eager", stream_chunks=4, stream_attention=True)
    compiled = torch.compile(step, backend=be)
    _assert_close(_grads(model, lambda: compiled(ids, mask, labels)), ref, zero=("self.key.bias",))
    regions = _regions(be)
    attn = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    assert sum(n.target is attn for r in regions for n in r.body.graph.nodes) == 2
    assert {mode for r in regions for _, mode in r.plan.attentions} == {"whole"}
    whole = [lay for r in regions for lay in r.input_layouts if isinstance(lay, Tok) and lay.whole]
    assert len(whole) == 4  # each layer's K and V, read whole by every chunk
    assert all(r.chunk_runs >= 4 for r in regions)


class _MaskedAttention(torch.nn.Module):
    """embedding -> one attention whose boolean mask the model builds -> LM head -> cross-entropy."""

    def __init__(self, kind):
        super().__init__()
        self.emb = torch.nn.Embedding(64, 32)
        self.qkv = torch.nn.Linear(32, 96)
        self.out = torch.nn.Linear(32, 64)
        self.kind = kind

    def forward(self, ids, tgt, data_mask):
        B, T = ids.shape
        q, k, v = self.qkv(self.emb(ids)).view(B, T, 3, 2, 16).permute(2, 0, 3, 1, 4)
        pos = torch.arange(T, device=ids.device)
        if self.kind == "window":  # causal, and at most 8 keys back: a conjunction with k <= q
            mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - 8)
        elif self.kind == "anticausal":  # each query sees itself and the keys after it
            mask = pos[:, None] <= pos[None, :]
        elif self.kind == "shifted":  # k <= q + 1: one key ahead, not provably causal
            mask = pos[None, :] <= (pos + 1)[:, None]
        else:  # data: whatever the batch says
            mask = data_mask
        h = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h.transpose(1, 2).reshape(B, T, 32)
        return torch.nn.functional.cross_entropy(self.out(h).flatten(0, 1), tgt.flatten())


@pytest.mark.parametrize("kind,mode", [("window", "prefix"), ("anticausal", "whole"), ("shifted", "whole"),
                                       ("data", "whole")])
def test_explicit_masks_stream_exactly_prefix_only_when_proven_causal(kind, mode):
    """A mask is read by the prefix only where the graph proves it causal; any other mask is read against
    all keys. Either way the step equals eager's (an unproven mask cut to the prefix would not: the
    anticausal and shifted masks allow keys after the chunk)."""
    torch.manual_seed(0)
    m = _MaskedAttention(kind)
    ids, tgt = torch.randint(0, 64, (2, 32)), torch.randint(0, 64, (2, 32))
    data_mask = torch.rand(2, 1, 32, 32) < 0.7
    data_mask |= torch.eye(32, dtype=torch.bool)  # no query row without a key
    ref = _grads(m, lambda: m(ids, tgt, data_mask))
    be = memfit.backend(passes=["stream"], inner="eager", stream_chunks=4, stream_attention=True)
    compiled = torch.compile(m, backend=be)
    _assert_close(_grads(m, lambda: compiled(ids, tgt, data_mask)), ref)
    regions = _regions(be)
    assert [mode_ for r in regions for _, mode_ in r.plan.attentions] == [mode]
    assert all(r.chunk_runs >= 4 for r in regions if r.plan.attentions)


class _TokenMLP(torch.nn.Module):
    """embedding -> linear -> (dropout | cumsum over tokens) -> linear -> cross-entropy."""

    def __init__(self, middle):
        super().__init__()
        self.emb = torch.nn.Embedding(64, 32)
        self.a = torch.nn.Linear(32, 32)
        self.b = torch.nn.Linear(32, 64)
        self.middle = middle

    def forward(self, ids, tgt):
        h = self.middle(self.a(self.emb(ids)).relu())
        return torch.nn.functional.cross_entropy(self.b(h).flatten(0, 1), tgt.flatten())


def test_dropout_ends_regions_with_a_reason_and_stays_exact():
    """Dropout's mask cannot be drawn chunk by chunk as it is drawn whole: the draw stays outside the
    regions (drawn whole, then sliced per chunk as an input), and the step equals the same compiled
    step without streaming (same RNG draws)."""
    torch.manual_seed(0)
    m = _TokenMLP(torch.nn.Dropout(0.3)).train()
    ids, tgt = torch.randint(0, 64, (2, 32)), torch.randint(0, 64, (2, 32))
    got = {}
    for name, passes in (("plain", []), ("stream", ["stream"])):
        torch._dynamo.reset()
        be = memfit.backend(passes=passes, inner="eager", stream_chunks=2)
        compiled = torch.compile(m, backend=be)
        torch.manual_seed(5)
        got[name] = _grads(m, lambda: compiled(ids, tgt))
    _assert_close(got["stream"], got["plain"])
    notes = " ".join(be.records[0].notes)
    assert "stream: regions end at" in notes
    regions = _regions(be)
    assert len(regions) == 2

    def random(gm):
        return [n for n in gm.graph.nodes if n.op == "call_function"
                and torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ())]

    assert not any(random(r.body) for r in regions)
    assert random(be.records[0].pair.forward)  # drawn in the forward graph, outside the stream ops


def test_op_without_a_rule_ends_the_region_and_is_named():
    class Cumsum(torch.nn.Module):
        def forward(self, h):
            return h.cumsum(dim=1)  # mixes the tokens: no rule

    torch.manual_seed(0)
    m = _TokenMLP(Cumsum())
    ids, tgt = torch.randint(0, 64, (2, 32)), torch.randint(0, 64, (2, 32))
    ref = _grads(m, lambda: m(ids, tgt))
    be = memfit.backend(passes=["stream"], inner="eager", stream_chunks=2)
    compiled = torch.compile(m, backend=be)
    _assert_close(_grads(m, lambda: compiled(ids, tgt)), ref)
    notes = " ".join(be.records[0].notes)
    assert "cumsum: no streaming rule for this op" in notes
    regions = _regions(be)
    assert len(regions) == 2  # before the cumsum, and after it up to the loss
    assert not any(n.target is torch.ops.aten.cumsum.default for r in regions for n in r.body.graph.nodes)


def test_no_token_input_is_reported():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    be = memfit.backend(passes=["stream"], inner="eager")
    with pytest.warns(UserWarning, match="stream pass not applied"):
        torch.compile(model, backend=be)(torch.randn(4, 8)).sum().backward()
    assert any("stream: not applied: no integer [batch, seq] input" in n for n in be.records[0].notes)


def test_layout_rules():
    def g(ids, w):
        x = torch.nn.functional.embedding(ids, w)  # [B, T, 32]
        return x.view(-1, 32), x.view(2, 16, 4, 8).transpose(1, 2)

    ids, w = torch.randint(0, 10, (2, 16)), torch.randn(10, 32)
    gm = sp.to_aten(torch.fx.symbolic_trace(g), [ids, w])
    info = analyse(gm, seq_len_of([ids, w]))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert info.layout[out[0]] == Tok(0, outer=2, inner=1)  # rows of [B*T, d]: batch outside the tokens
    assert info.layout[out[1]] == Tok(2)  # [B, heads, T, hd]
    # a view that splits the token dim stops, with the reason recorded
    def split(ids, w):
        return torch.nn.functional.embedding(ids, w).view(2, 4, 4, 32)  # T=16 split into 4 x 4

    gm = sp.to_aten(torch.fx.symbolic_trace(split), [ids, w])
    info = analyse(gm, 16)
    view = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.view.default)
    assert view not in info.member and "splits the token dim" in info.reason[view]
    # rows() takes chunk rows in both layouts
    tok = Tok(1)
    x = torch.arange(2 * 6 * 3.0).view(2, 6, 3)
    torch.testing.assert_close(tok.rows(x, 6, 2, 4), x[:, 2:4])
    flat = Tok(0, outer=2)
    torch.testing.assert_close(flat.rows(x.view(12, 3), 6, 2, 4), x[:, 2:4].reshape(4, 3))


def test_dropout_traces_as_native_dropout_and_the_rows_after_it_stream():
    """``F.dropout`` traces to ``native_dropout`` (as AOTAutograd traces it for plain ``torch.compile``), not
    to ATen's C++ ``empty_like + bernoulli_`` (a float32 noise saved for the backward; Inductor's CPU
    fallback for the ``bernoulli_`` was fused after its reader: NaN). The dropout is random, so it ends a
    region; the ops after it take its output by rows (its layout kept through the op's two outputs)."""
    def g(ids, w, fc):
        x = torch.nn.functional.embedding(ids, w)
        y = torch.nn.functional.dropout(x @ fc, 0.1, True)
        return torch.softmax(y @ fc, -1)

    ids, w, fc = torch.randint(0, 10, (2, 16)), torch.randn(10, 32), torch.randn(32, 32)
    gm = sp.to_aten(torch.fx.symbolic_trace(g), [ids, w, fc])
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert aten.native_dropout.default in targets and not any("bernoulli" in str(t) for t in targets)
    plan, info = find_regions(gm, 16, 4, needs_grad=set())
    drop = next(n for n in gm.graph.nodes if n.target is aten.native_dropout.default)
    assert drop not in info.member and "random op" in info.reason[drop]
    assert info.layout[drop] == (Tok(1), Tok(1))
    # two regions: the matmul before the dropout, and the matmul and softmax after it, which reads the
    # dropout's output by rows
    assert len(plan.regions) == 2, plan
    after = plan.regions[1]
    inp = next(u.name for u in drop.users if u.target is operator.getitem and u.args[1] == 0)
    assert inp in after.inputs and after.input_layouts[after.inputs.index(inp)] == Tok(1)


def test_options_and_attention_default():
    with pytest.raises(ValueError, match="stream_chunks=0 must be a positive int"):
        memfit.backend(passes=["stream"], stream_chunks=0)
    with pytest.raises(ValueError, match="stream_attention='yes' must be True, False or None"):
        memfit.backend(passes=["stream"], stream_attention="yes")
    # with no budget to meet, the attentions stay whole (cheaper on CPU) and end the regions, saying why
    model, idx, tgt = _gpt()
    be = memfit.backend(passes=["stream"], inner="eager", stream_chunks=2)
    torch.compile(model, backend=be)(idx, tgt).backward()
    attn = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    assert len(_ops(be.records[0].pair.forward, attn)) == 2
    assert any("not needed for the budget" in n for n in be.records[0].notes)
    assert "stream" not in memfit.backend(passes="auto").passes  # opt-in for now


def test_peak_drops_by_the_logits_and_is_predicted():
    """Effect, measured (eager inner: the allocator's peak on CPU): the LM head's logits, log-probs and
    their gradient ([tokens, vocab] each) no longer exist; the predicted peak follows the measured one."""
    model, idx, tgt = _gpt(batch=1, seq=512, block_size=512, vocab_size=8192, n_embd=64)
    results = {}
    for name, opts in {"plain": dict(passes=[]), "stream": dict(passes=["stream"])}.items():
        torch._dynamo.reset()
        be = memfit.backend(inner="eager", **opts)
        m = measure(training_step(torch.compile(copy.deepcopy(model), backend=be), (idx, tgt)), repeat=1)
        results[name] = (m.peak_bytes, be.records[-1].analysis.memory.peak_bytes)
    logits = 512 * 8192 * 4
    (plain, _), (streamed, pred) = results["plain"], results["stream"]
    assert streamed <= plain - 2 * logits, (plain, streamed)
    assert abs(pred - streamed) <= 0.05 * streamed, (pred, streamed)


def test_budget_raises_the_chunk_count_until_the_prediction_fits():
    """The chunk count is part of the plan: with a budget under the default plan's predicted peak, the
    planner doubles the counts until the predicted peak fits, and the measured peak follows."""
    model, idx, tgt = _gpt(batch=1, seq=1024, block_size=1024, vocab_size=8192, n_embd=64)
    be0 = memfit.backend(passes=["stream"], inner="eager")
    torch.compile(copy.deepcopy(model), backend=be0)(idx, tgt).backward()
    default_chunks = max(r.plan.chunks for r in _regions(be0))
    default_peak = be0.records[-1].analysis.memory.peak_bytes
    torch._dynamo.reset()
    budget = int(default_peak * 0.93)
    be = memfit.backend(passes=["stream"], inner="eager", budget=budget)
    m = measure(training_step(torch.compile(copy.deepcopy(model), backend=be), (idx, tgt)), repeat=1)
    chunks = max(r.plan.chunks for r in _regions(be)[-3:])
    assert chunks > default_chunks
    assert any("trying more" in n for n in be.records[-1].notes)
    assert be.records[-1].analysis.memory.peak_bytes <= budget
    assert m.peak_bytes <= budget * 1.02, (m.peak_bytes, budget)


def test_budget_met_with_fewer_chunks_takes_the_fewest():
    """Under a budget the default count (128 tokens a chunk) beats by a margin, the planner halves the
    counts while the prediction fits (wider chunks, wider matmuls, fewer launches: measured faster, see
    ``memfit.compiler.search.fewer_chunks``): here the LM head alone in 4 chunks instead of 8. The step matches
    the unstreamed one, the prediction is within the budget and the allocator's peak follows it."""
    model, idx, tgt = _gpt(batch=1, seq=1024, block_size=1024, vocab_size=8192, n_embd=64)
    budget = 40 * 2**20  # the plain step peaks at 104.58 MiB; the LM head in 8 chunks at 20.58, in 4 at 32.96
    be = memfit.backend(passes=["stream"], inner="eager", budget=budget)
    ref_model = copy.deepcopy(model)
    ref = _grads(ref_model, lambda: ref_model(idx, tgt))
    compiled = torch.compile(model, backend=be)
    _assert_close(_grads(model, lambda: compiled(idx, tgt)), ref)
    (region,) = _regions(be)
    assert region.plan.chunks == 4 and region.chunk_runs >= 4
    notes = be.records[-1].notes
    assert any(n.startswith("stream: fewer chunks fit the budget too (s2 8 -> 4") for n in notes), notes
    pred = be.records[-1].analysis.memory.peak_bytes
    assert pred <= budget
    m = measure(training_step(compiled, (idx, tgt)), repeat=1)
    assert abs(m.peak_bytes - pred) <= 0.02 * pred, (m.peak_bytes, pred)


def test_stream_and_checkpoint_at_the_smallest_budget():
    """``passes=["stream", "checkpoint"]`` at a budget only attention by query chunks reaches: the chunk
    search's probes of the streamed graph trace again without failing (a ``view`` of the transposed
    attention output once assumed the first trace's layout: "Cannot view a tensor"), the step matches
    the unstreamed one, and the measured peak is within the budget."""
    model, idx, tgt = _gpt(n_layer=4, seq=128, block_size=128)
    with pytest.raises(BudgetError) as e:
        torch.compile(copy.deepcopy(model), backend=memfit.backend(passes=["stream", "checkpoint"], inner="eager", budget=1))(idx, tgt)
    budget = int(e.value.smallest_peak * 1.05)
    torch._dynamo.reset()
    be = memfit.backend(passes=["stream", "checkpoint"], inner="eager", budget=budget)
    ref_model = copy.deepcopy(model)
    ref = _grads(ref_model, lambda: ref_model(idx, tgt))
    compiled = torch.compile(model, backend=be)
    _assert_close(_grads(model, lambda: compiled(idx, tgt)), ref)
    notes = be.records[-1].notes
    assert any("attentions by query chunks" in n for n in notes), notes
    attn = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    regions = _regions(be)
    assert all(r.plan.chunks > 1 for r in regions)
    assert sum(n.target is attn for r in regions for n in r.body.graph.nodes) == 4  # every layer's, by query chunks
    assert be.records[-1].analysis.memory.peak_bytes <= budget
    m = measure(training_step(compiled, (idx, tgt)), repeat=1)
    assert m.peak_bytes <= budget * 1.02, (m.peak_bytes, budget)
