"""share_norms: a norm's backward reads its output instead of its input (exact).

Numerics: loss and every gradient (the input's too) against eager at fp32 rounding. Structure: the
site's kind, and the norm's input gone from what the backward receives. Effect: the saved bytes fall by
at least the inputs' bytes (exactly, for a LayerNorm), the predicted peak falls, and on a Hugging Face
Llama the allocator's measured peak falls too.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import memfit
import memfit.hf
from memfit.measurement import measure, training_step
from memfit.planner.cost import tensor_bytes

transformers = pytest.importorskip("transformers")


class LlamaStyleRMSNorm(nn.Module):
    """HF's ``LlamaRMSNorm``, written out as it is there."""

    def __init__(self, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


NORMS = {
    "layer_norm": lambda h: nn.LayerNorm(h),
    "layer_norm_no_affine": lambda h: nn.LayerNorm(h, elementwise_affine=False),
    "llama_rms": LlamaStyleRMSNorm,
    "nn_rms": lambda h: nn.RMSNorm(h),
}


class Block(nn.Module):
    """A pre-norm residual block: the norm's input is the residual stream (not a graph input)."""

    def __init__(self, norm: str, hidden: int = 64):
        super().__init__()
        self.up = nn.Linear(hidden, hidden)
        self.norm = NORMS[norm](hidden)
        self.fc = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(2 * hidden, hidden)
        with torch.no_grad():  # γ and β away from 1 and 0, so a wrong recovery shows
            for p in self.norm.parameters():
                p.add_(0.2 * torch.randn_like(p))

    def forward(self, x):
        h = self.up(x) + x  # a residual stream: no backward reads it but the norm's
        return (self.out(torch.relu(self.fc(self.norm(h)))) + h).pow(2).mean()


def _saved(pair) -> dict[str, int]:
    """What the backward receives from the forward: {name: bytes}."""
    from torch._functorch.partitioners import _is_tangent

    return {n.name: tensor_bytes(n.meta["val"]) for n in pair.backward.graph.nodes
            if n.op == "placeholder" and not _is_tangent(n) and isinstance(n.meta.get("val"), torch.Tensor)}


def _compile_and_compare(model, x, **options):
    torch.manual_seed(0)
    ref = copy.deepcopy(model)
    backend = memfit.backend(**options)
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss = torch.compile(model, backend=backend)(xs)
    loss.backward()
    want = ref(xr)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"grad of {name}: {m}")
    (record,) = backend.records
    return record


# Inductor's own form is the decomposed LayerNorm; its RMSNorm is the written-out one (Llama, below)
@pytest.mark.parametrize("norm,inner", [(n, "eager") for n in NORMS] + [("layer_norm", "inductor")])
def test_each_norm_form_is_exact_and_drops_its_input(norm, inner):
    torch.manual_seed(0)
    record = _compile_and_compare(Block(norm), torch.randn(4, 32, 64), passes=["share_norms"], inner=inner)
    # structure: one site of the expected form, and its input is no longer what the backward receives
    assert record.share is not None and len(record.share.sites) == 1, record.notes
    site = record.share.sites[0]
    want_kind = {"layer_norm": "layer_norm" if inner == "eager" else "layer_norm_decomposed",
                 "layer_norm_no_affine": "layer_norm", "llama_rms": "rms_norm", "nn_rms": "rms_norm"}[norm]
    assert site.kind == want_kind
    before, after = _saved(record.before_pair), _saved(record.pair)
    if inner == "eager":  # the default partition saves what the backward reads: x before, y after
        assert site.input in before and site.input not in after and site.output in after
    else:  # the min-cut saves sources to recompute x from (the model's input and the linear's output) before
        assert site.input not in after and site.output in after
    # effect: the input's bytes (4 x 32 x 64 fp32) leave the saved set, and the predicted peak falls
    assert site.saved_bytes == 4 * 32 * 64 * 4
    dropped = record.before.memory.saved_bytes - record.analysis.memory.saved_bytes  # views of y are y
    if norm.startswith("layer_norm") and inner == "eager":
        assert dropped == site.saved_bytes  # x only; mean and rstd stay (the new backward reads them)
    else:
        assert dropped >= site.saved_bytes  # the written-out backward also saved 2 * x
    assert record.analysis.memory.peak_bytes < record.before.memory.peak_bytes
    assert any(r["technique"] == "share_norms" and r["value"] == site.input for r in record.decisions)


def test_zero_gamma_is_left_as_it_is_with_the_reason():
    torch.manual_seed(0)
    model = Block("layer_norm")
    with torch.no_grad():
        model.norm.weight[3] = 0.0
    record = _compile_and_compare(model, torch.randn(4, 32, 64), passes=["share_norms"], inner="eager")
    assert record.share is None
    assert any("γ" in n and "zeros" in n and getattr(n, "code", None) == "left_exact" for n in record.notes), record.notes
    assert record.analysis.memory.peak_bytes == record.before.memory.peak_bytes


def test_lower_precision_norm_is_left_as_it_is():
    """A bf16 model: the norm computes in fp32 and rounds its output; recovering x̂ from it would round."""
    torch.manual_seed(0)
    model = Block("llama_rms").to(torch.bfloat16)
    backend = memfit.backend(passes=["share_norms"], inner="eager")
    torch.compile(model, backend=backend)(torch.randn(2, 16, 64, dtype=torch.bfloat16)).backward()
    (record,) = backend.records
    assert record.share is None
    assert any("float32/float64" in n for n in record.notes), record.notes


def _hf(name: str, seq: int = 64):
    t = transformers
    torch.manual_seed(0)
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    if name == "gpt2":
        model = t.GPT2LMHeadModel(t.GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=seq,
                                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    elif name == "llama":
        model = t.LlamaForCausalLM(t.LlamaConfig(num_key_value_heads=2, **common))
    elif name == "bert":
        model = t.BertForMaskedLM(t.BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common))
    elif name == "t5":
        model = t.T5ForConditionalGeneration(t.T5Config(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                                        num_heads=4, dropout_rate=0.0))
    else:
        raise ValueError(name)
    with torch.no_grad():  # γ and β away from their initial 1 and 0
        for n, p in model.named_parameters():
            if "norm" in n.lower() or n.split(".")[-2].startswith("ln"):
                p.add_(0.1 * torch.randn_like(p))
    model.train()
    ids = torch.randint(0, 512, (2, seq), generator=torch.Generator().manual_seed(0))
    kwargs = dict(input_ids=ids, labels=ids)
    if name == "t5":
        kwargs["decoder_input_ids"] = ids
    return model, kwargs


def _grads_close(model, ref, rtol):
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and want
    scale = max(g.abs().max().item() for g in want.values())
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=rtol * scale, msg=lambda m: f"grad of {k}: {m}")


# sites per family (2 layers): GPT-2 2 x 2 + ln_f; Llama 2 x 2 + the final norm; BERT 2 x 2 + the
# prediction head's (its embeddings' LayerNorm feeds only adds and dropout: left, with the reason);
# T5 encoder and decoder, 2 x 2 + 2 x 3 (the final norms of each stack feed no linear directly: left)
SITES = {"gpt2": 5, "llama": 5, "bert": 5, "t5": 10}


@pytest.mark.parametrize("name,inner", [("gpt2", "eager"), ("llama", "eager"), ("bert", "eager"), ("t5", "eager"),
                                        ("llama", "inductor")])
def test_hf_families_compiled_whole(name, inner):
    """HF models compiled whole as users call them: loss and every gradient equal eager's, every norm that
    feeds a linear shares its output, the saved bytes fall by at least the norms' inputs and the predicted
    peak falls."""
    model, kwargs = _hf(name)
    ref = copy.deepcopy(model)
    memfit.hf.compile(model, passes=["share_norms"], inner=inner)
    out = model(**kwargs)
    out.loss.backward()
    want = ref(**kwargs)
    want.loss.backward()
    rtol = 1e-5 if inner == "eager" else 1e-4
    torch.testing.assert_close(out.loss, want.loss, rtol=rtol, atol=1e-6)
    _grads_close(model, ref, rtol)
    (record,) = model.memfit.backend.latest_records()
    assert record.share is not None and len(record.share.sites) == SITES[name], record.notes
    after = _saved(record.pair)
    assert not any(s.input in after for s in record.share.sites)
    before_peak, after_peak = record.before.memory.peak_bytes, record.analysis.memory.peak_bytes
    assert after_peak < before_peak, (before_peak, after_peak)
    assert record.before.memory.saved_bytes - record.analysis.memory.saved_bytes >= record.share.saved_bytes
    if name == "bert":
        assert any("embeddings" in n and "nothing else in the backward reads its output" in n for n in record.notes)


def test_measured_peak_falls_on_llama():
    """The allocator's peak of a 4-layer Llama training step (eager inner, where every saved value is an
    allocation): at least 10% below the same compile without sharing, measured in the same run."""
    model, kwargs = _hf("llama", seq=256)
    ref = copy.deepcopy(model)
    memfit.hf.compile(model, passes=["share_norms"], inner="eager")
    memfit.hf.compile(ref, passes=[], inner="eager")
    shared = measure(training_step(model, (), kwargs), repeat=1).peak_bytes
    plain = measure(training_step(ref, (), kwargs), repeat=1).peak_bytes
    assert shared < 0.9 * plain, (shared, plain)


def test_auto_shares_norms_when_that_fits():
    """``passes="auto"`` with a budget between the shared and the unchanged peak: the shared partition is
    a candidate, it fits, and it is chosen (no recomputation needed); at the unchanged peak, nothing changes."""
    torch.manual_seed(0)
    probe = memfit.backend(passes=["share_norms"], inner="eager")
    torch.compile(Block("layer_norm"), backend=probe)(torch.randn(4, 32, 64)).backward()
    (p,) = probe.records
    lo, hi = p.analysis.memory.peak_bytes, p.before.memory.peak_bytes
    torch.manual_seed(0)
    record = _compile_and_compare(Block("layer_norm"), torch.randn(4, 32, 64), passes="auto", inner="eager",
                                  budget=(lo + hi) // 2)
    assert record.share is not None and record.plan is None
    chosen = [c for c in record.candidates if c["chosen"]]
    assert [c["label"] for c in chosen] == ["share_norms"]
    assert record.analysis.memory.peak_bytes == lo
    torch.manual_seed(0)
    record = _compile_and_compare(Block("layer_norm"), torch.randn(4, 32, 64), passes="auto", inner="eager", budget=hi)
    assert record.share is None
