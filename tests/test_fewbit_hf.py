"""Few-bit on Hugging Face activations written as op chains (``ACT2FN``'s ``gelu_new``, ``gelu_fast``,
``gelu_python``, ``gelu_accurate``, ``quick_gelu``): matched in the joint graph, rewritten, and reported.

Numerics: the compiled gradients are the few-bit gradients (an eager copy whose activations run a
hand-written ``grad * level[code(x)]`` backward), the forward is eager's, and on standard-normal inputs
the input gradient's error is the table's figure. Structure: ``memfit::fewbit_grad`` replaces the
chain's backward and the chain's saved tensors are gone from the forward's outputs. Effect: the saved
bytes fall by exactly what those tensors held less the codes. Models are real HF models from small
configs (GPT-2 and Phi with ``gelu_new``, Llama with ``quick_gelu``), called with ``labels=``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from helpers import FewbitReference
import memfit
from memfit.kernels import fewbit_tables as T

transformers = pytest.importorskip("transformers")
from transformers.activations import ACT2FN  # noqa: E402

BITS = 2
#: HF activation name -> (the table its chain is matched to, the class that writes the chain)
CHAINS = {
    "gelu_new": ("gelu_tanh", "NewGELUActivation"),
    "gelu_fast": ("gelu_tanh", "FastGELUActivation"),
    "gelu_accurate": ("gelu_tanh", "AccurateGELUActivation"),
    "gelu_python": ("gelu", "GELUActivation"),
    "quick_gelu": ("quick_gelu", "QuickGELUActivation"),
}


_FewbitRef = FewbitReference


class _RefAct(nn.Module):
    def __init__(self, act, kind):
        super().__init__()
        self.act, self.table = act, T.table(kind, BITS)

    def forward(self, x):
        return _FewbitRef.apply(x, self.act, self.table)


def _saved(pair) -> dict[str, torch.Tensor]:
    outs = list(pair.forward.graph.nodes)[-1].args[0][pair.num_user_outputs:]
    return {o.name: o.meta["val"] for o in outs}


def _with_bases(gm, names: set[str]) -> set[str]:
    """``names`` and the tensors they view (GPT-2's Conv1D activation input is a view of an addmm; a
    partition may save the addmm)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    out = set(names)
    for name in names:
        n = nodes.get(name)
        while n is not None and n.op == "call_function" and getattr(n.target, "is_view", False):
            n = n.args[0]
            out.add(n.name)
    return out


def _base(gm, name: str) -> str:
    """The tensor whose storage ``name`` shares (through views, detach and alias)."""
    n = next(n for n in gm.graph.nodes if n.name == name)
    while n.op == "call_function" and (getattr(n.target, "is_view", False) or n.target in (
            torch.ops.aten.detach.default, torch.ops.aten.alias.default)):
        n = n.args[0]
    return n.name


def _targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


# -- the activations alone: the table's error on normal inputs, forward exact ------------------------
@pytest.mark.parametrize("name", list(CHAINS))
def test_chain_gradient_error_is_the_tables(name):
    """``act(I @ w)`` so that ``w.grad`` is the activation's input gradient, element for element, and the
    activation's input is a matmul result (a primal would be saved anyway: codes would add bytes)."""
    kind, cls = CHAINS[name]
    act = ACT2FN[name]
    torch.manual_seed(0)
    n = 256
    w0, g, eye = torch.randn(n, n), torch.randn(n, n), torch.eye(n)

    def fn(w):
        return (act(eye @ w) * g).sum()

    be = memfit.backend(passes=["fewbit"], inner="eager", fewbit_bits=BITS)
    w = w0.clone().requires_grad_()
    out = torch.compile(fn, backend=be)(w)
    out.backward()
    ref = w0.clone().requires_grad_()
    out_ref = fn(ref)
    out_ref.backward()
    assert torch.equal(out, out_ref)  # forward: the model's own ops
    (site,) = be.records[0].fewbit.sites
    table = T.table(kind, BITS)
    assert (site.kind, site.chain, site.rel_error) == (kind, cls, table.rel_error)
    exact = ref.grad
    fewbit = g * torch.tensor(table.approx(w0.numpy()), dtype=torch.float32)
    torch.testing.assert_close(w.grad, fewbit, rtol=1e-6, atol=1e-6)
    err = ((w.grad - exact).norm() / exact.norm()).item()
    assert err == pytest.approx(table.rel_error, rel=0.05)  # 2 bits: 13.3% (tanh-GELU), 13.2% (GELU), 12.5% (quick)


def test_relu_squared_is_declined_with_the_reason():
    """relu2's derivative 2*relu(x) is unbounded: the chain is reported and left exact; only its
    ``threshold_backward`` (exact at 1 bit) is coded by the single-op rule, as before."""
    torch.manual_seed(0)
    w0, eye = torch.randn(64, 64), torch.eye(64)
    act = ACT2FN["relu2"]
    be = memfit.backend(passes=["fewbit"], inner="eager")
    w = w0.clone().requires_grad_()
    torch.compile(lambda w: act(eye @ w).sum(), backend=be)(w).backward()
    ref = w0.clone().requires_grad_()
    act(eye @ ref).sum().backward()
    torch.testing.assert_close(w.grad, ref.grad, rtol=0, atol=0)
    rec = be.records[0]
    assert any("relu2" in n and "unbounded" in n and n.code == "left_exact" for n in rec.notes), rec.notes
    assert all(not s.replaced for s in (rec.fewbit.sites if rec.fewbit else ()))


def test_unmatched_and_non_analytic_chains_are_reported_and_left_exact():
    """A chain whose derivative is no table's, one that reads a clamp's mask, and one that matches a
    table on every probe but has a relu (the probes could miss where it bites): all exact, all with the
    reason."""
    torch.manual_seed(0)
    w0, eye = torch.randn(64, 64), torch.eye(64)
    fns = {
        "no table": lambda h: h * torch.sigmoid(1.702 * h) + 1e-3 * h * h,
        "mask": lambda h: h * torch.sigmoid(1.702 * h.clamp(min=-50.0)),
        "not analytic": lambda h: h * torch.sigmoid(1.702 * (torch.relu(h + 50.0) - 50.0)),
    }
    expected = {
        "no table": "for no table (tried gelu_tanh",
        "mask": "forward values from outside the chain",
        "not analytic": "matches quick_gelu on the probes but uses relu, which is not analytic",
    }
    for why, act in fns.items():
        torch._dynamo.reset()
        be = memfit.backend(passes=["fewbit"], inner="eager")
        w = w0.clone().requires_grad_()
        torch.compile(lambda w, act=act: act(eye @ w).sum(), backend=be)(w).backward()
        ref = w0.clone().requires_grad_()
        act(eye @ ref).sum().backward()
        torch.testing.assert_close(w.grad, ref.grad, rtol=1e-6, atol=1e-6)
        rec = be.records[0]
        assert not (rec.fewbit and any(s.replaced for s in rec.fewbit.sites))
        text = " ".join(n for n in rec.notes if n.code == "left_exact")
        assert expected[why] in text, rec.notes


def test_aten_gelu_is_still_the_single_op_rule():
    """``gelu_pytorch_tanh`` is one ATen op: its site is ``gelu_backward``'s, not a chain's."""
    torch.manual_seed(0)
    w0, g, eye = torch.randn(256, 256), torch.randn(256, 256), torch.eye(256)
    act = ACT2FN["gelu_pytorch_tanh"]
    be = memfit.backend(passes=["fewbit"], inner="eager")
    torch.compile(lambda w: (act(eye @ w) * g).sum(), backend=be)(w0.clone().requires_grad_()).backward()
    (site,) = be.records[0].fewbit.sites
    assert site.kind == "gelu_tanh" and site.backward.startswith("gelu_backward") and not site.replaced


# -- HF models ---------------------------------------------------------------------------------------
def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.125)
    model = transformers.GPT2LMHeadModel(cfg)
    return model, lambda m: [b.mlp for b in m.transformer.h], "act"


def _phi():
    cfg = transformers.PhiConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
                                 pad_token_id=0, initializer_range=0.125)
    assert cfg.hidden_act == "gelu_new"
    return transformers.PhiForCausalLM(cfg), lambda m: [b.mlp for b in m.model.layers], "activation_fn"


def _llama_quick_gelu():
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, hidden_act="quick_gelu",
                                   initializer_range=0.125)
    return transformers.LlamaForCausalLM(cfg), lambda m: [b.mlp for b in m.model.layers], "act_fn"


MODELS = {"gpt2": (_gpt2, "gelu_new"), "phi": (_phi, "gelu_new"), "llama": (_llama_quick_gelu, "quick_gelu")}


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _run(family: str, inner: str):
    torch._dynamo.reset()
    torch.manual_seed(0)
    build, act_name = MODELS[family]
    model, mlps, attr = build()
    model.train()
    ids = torch.randint(0, 256, (2, 32))
    exact, ref = copy.deepcopy(model), copy.deepcopy(model)
    kind, cls = CHAINS[act_name]
    for mlp in mlps(ref):
        setattr(mlp, attr, _RefAct(getattr(mlp, attr), kind))
    be = memfit.backend(passes=["fewbit"], inner=inner, fewbit_bits=BITS)
    compiled = torch.compile(lambda ids: model(input_ids=ids, labels=ids).loss, backend=be)
    loss = compiled(ids)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    torch._dynamo.reset()
    return dict(be=be, loss=loss.detach(), grads=grads, exact=_step(exact, ids), ref=_step(ref, ids), kind=kind, cls=cls,
                layers=len(mlps(model)), width=4 * 64 if family == "gpt2" else 128, fc=[k for k in grads if ".0.mlp." in k and "weight" in k][0])


@pytest.fixture(scope="module")
def gpt2_eager():
    return _run("gpt2", "eager")


@pytest.fixture(scope="module")
def gpt2_inductor():
    return _run("gpt2", "inductor")


@pytest.fixture(scope="module")
def phi_eager():
    return _run("phi", "eager")


@pytest.fixture(scope="module")
def llama_eager():
    return _run("llama", "eager")


RUNS = ["gpt2_eager", "gpt2_inductor", "phi_eager", "llama_eager"]


@pytest.mark.parametrize("run", RUNS)
def test_hf_gradients_are_the_few_bit_gradients(run, request):
    r = request.getfixturevalue(run)
    _, grads_ref = r["ref"]
    loss_exact, grads_exact = r["exact"]
    torch.testing.assert_close(r["loss"], loss_exact, rtol=1e-6, atol=1e-6)  # forward: the model's own
    scale = max(g.abs().max().item() for g in grads_ref.values())
    for k, g in grads_ref.items():
        torch.testing.assert_close(r["grads"][k], g, rtol=1e-4, atol=1e-5 * scale, msg=lambda m, k=k: f"grad of {k}: {m}")
    # approximate, at the table's scale: the first MLP weight's gradient against the exact one
    k = r["fc"]
    err = ((r["grads"][k] - grads_exact[k]).norm() / grads_exact[k].norm()).item()
    assert 0.02 < err < 1.5 * T.table(r["kind"], BITS).rel_error, err


@pytest.mark.parametrize("run", RUNS)
def test_hf_structure_and_saved_bytes(run, request):
    r = request.getfixturevalue(run)
    be = r["be"]
    rec = next(rec for rec in be.records if rec.fewbit is not None)
    sites = rec.fewbit.sites
    assert [(s.kind, s.chain) for s in sites] == [(r["kind"], r["cls"])] * r["layers"]  # every layer's MLP
    assert rec.partition == "fewbit"
    assert _targets(rec.pair.backward).count(torch.ops.memfit.fewbit_grad.default) == r["layers"]
    assert _targets(rec.pair.forward).count(torch.ops.memfit.fewbit_pack.default) == r["layers"]
    before, after = _saved(rec.before_pair), _saved(rec.pair)
    gone = set(before) - set(after)
    for s in sites:
        values = _with_bases(rec.before_pair.forward, {s.saved, *s.also_saved})
        assert values & gone and not values & set(after)  # the chain's saved tensors are gone
        assert s.code_bytes == 2 * 32 * r["width"] // 8 * BITS  # [2, 32, width] activation inputs, 2 bits each
    codes = [v for v in after.values() if v.dtype == torch.uint8]
    assert [c.numel() for c in codes] == [s.code_bytes for s in sites]
    # effect, counted exactly: the saved bytes fall by what the chains' tensors held, less the codes
    fall = rec.before.memory.saved_bytes - rec.analysis.memory.saved_bytes
    fw = rec.before_pair.forward
    storages = {_base(fw, v): before[v].untyped_storage().nbytes() for v in gone}  # a detach shares its tensor's
    assert fall == sum(storages.values()) - sum(s.code_bytes for s in sites) > 0
    if "eager" in run:  # AOTAutograd's default partition saves every value the chain's backward reads
        assert fall == rec.fewbit.bytes_saved and len(storages) == len(sites) * (1 + len(sites[0].also_saved))
    else:  # Inductor's min-cut saves the activation's input alone and recomputes the chain from it
        assert len(storages) == len(sites)
    # the report lists every site
    lines = [n for n in rec.notes if n.technique == "fewbit" and f"{r['kind']} at transformers/activations.py" in n]
    assert len(lines) == r["layers"]
