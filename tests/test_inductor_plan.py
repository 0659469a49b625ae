"""Inductor's buffer plan, replayed into the step's memory model, and the re-planning it drives.

The model: a 2-layer nanoGPT (128 wide, vocabulary 2048, 2 x 256 tokens, tied embeddings), where the
FX-level model and Inductor part ways by megabytes: the [tokens, vocab] logits gradient is kept to the
end of the backward by the ``addmm`` rewrite, and reused buffers, in-place kernels and the attention's
output tuple move frees around.
"""


import pytest
import torch

import memfit
from memfit import BudgetError
from memfit.measurement import measure, training_step
from memfit.planner import choice
from memfit.planner.inductor_plan import ALLOC, FREE

MiB = 2**20
TOKENS, VOCAB = 512, 2048


def _gpt():
    import gpt

    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(vocab_size=VOCAB, block_size=256, n_layer=2, n_head=4, n_embd=128))
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, VOCAB, (2, 256), generator=g)
    return model, (idx, torch.randint(0, VOCAB, (2, 256), generator=g))


def _eager_grads(args):
    model, _ = _gpt()
    loss = model(*args)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _assert_matches_eager(model, compiled, args):
    """One more compiled step: its loss and every gradient equal eager's on a fresh copy of the model."""
    model.zero_grad(set_to_none=True)
    loss = compiled(*args)
    loss.backward()
    ref_loss, ref_grads = _eager_grads(args)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_replayed_plan_matches_the_allocator():
    """No budget: the replayed step peak equals the measured one within 2% (13.78 MiB both here); the
    backward writes the cross-entropy gradient over the saved exp of the logits (a donated input),
    so it allocates no [tokens, vocab] buffer of its own, while the forward allocates the logits once."""
    model, args = _gpt()
    be = memfit.backend()
    step = training_step(torch.compile(model, backend=be), args)
    meas = measure(step, repeat=1)
    (rec,) = be.records
    fw, bw = rec.buffer_plans[f"{rec.name}.fw"], rec.buffer_plans[f"{rec.name}.bw"]
    logits = TOKENS * VOCAB * 4
    assert [n for kind, _, n in fw.events if kind == ALLOC and n == logits] == [logits]
    assert not [n for kind, _, n in bw.events if kind == ALLOC and n >= logits]
    # the backward drops saved activations as it goes (del), parameters it reads stay resident
    freed_inputs = {k for kind, k, _ in bw.events if kind == FREE and isinstance(k, str)}
    assert any(k.startswith("primals") for k in freed_inputs) and len(freed_inputs) > 20
    replayed = be.step_analysis().memory.peak_bytes
    assert replayed == rec.compiled.peak_bytes == rec.peak_bytes
    ratio = meas.peak_bytes / replayed
    print(f"replayed {replayed / MiB:.2f} MiB, measured {meas.peak_bytes / MiB:.2f} MiB ({ratio:.3f})")
    assert 0.98 <= ratio <= 1.02


def test_budget_is_checked_on_the_compiled_plan():
    """A budget of 0.8x the unplanned peak: the graph is compiled (re-planned if its first compile
    replays over the budget), the kept compile's replayed peak is within the budget, the allocator's
    peak too (+2% and the attention backward's 0.12 MiB scratch, which no plan shows), and the loss and
    every gradient equal eager's."""
    model, args = _gpt()
    budget = int(0.8 * 13.78 * MiB)
    be = memfit.backend(budget=budget)
    compiled = torch.compile(model, backend=be)
    step = training_step(compiled, args)
    meas = measure(step, repeat=1)
    (rec,) = be.records
    # a checkpoint plan here; under some CPU calibrations auto finds none whose compile fits and streams
    # the token-wise regions instead (exact too): either way the kept compile is checked on Inductor's plan
    assert rec.compiled is not None and (rec.plan is not None or rec.partition.startswith("stream"))
    assert rec.compiled.peak_bytes <= budget
    assert any(n.startswith("inductor: the compiled graphs' buffer plans replay") for n in rec.notes)
    assert meas.peak_bytes <= 1.02 * budget + 0.125 * MiB, (meas.peak_bytes / MiB, budget / MiB)
    _assert_matches_eager(model, compiled, args)


def test_replanning_reaches_the_smallest_peak_plan(monkeypatch):
    """Under the CPU profile of a CI machine (60 GFLOP/s, 20 GB/s, 10 us a launch), checkpointing alone at
    0.8x the unplanned peak: the first plan compiles to 11.47 MiB and the tighter re-plan to 11.60 (over
    the 11.02 MiB budget both: Inductor's peak does not fall with the planned one), so re-planning is out
    of tries; the planner's smallest-peak plan is then compiled, fits, and is kept. (Before, the loop
    ended first and the graph was refused; CI's auto compile then streamed it.) Loss and every gradient
    equal eager's; the allocator's peak is within the budget (+2% and the attention backward's scratch)."""
    from memfit.planner import cost

    prof = cost._cpu_profile(60e9, 20e9, 10e-6, {"fewbit_pack": 120.0, "fewbit_grad": 120.0})
    monkeypatch.setattr(cost, "calibrate_cpu", lambda: prof)
    model, args = _gpt()
    budget = int(0.8 * 13.78 * MiB)
    be = memfit.backend(budget=budget, passes=["checkpoint"])
    compiled = torch.compile(model, backend=be)
    meas = measure(training_step(compiled, args), repeat=1)
    (rec,) = be.records
    assert rec.plan is not None and rec.compiled.peak_bytes <= budget
    (tries,) = [n for n in rec.notes if n.startswith("inductor: replayed compiled peaks per try")]
    assert tries.count("MiB") - 1 >= 3, tries  # the first plan, at least one re-plan, the smallest-peak plan
    assert meas.peak_bytes <= 1.02 * budget + 0.125 * MiB, (meas.peak_bytes / MiB, budget / MiB)
    _assert_matches_eager(model, compiled, args)


def test_over_budget_compile_is_replanned_then_refused(monkeypatch):
    """Without the planner's margin, a 9.5 MiB budget admits a plan the FX model puts at 9.27 MiB,
    which Inductor compiles to 9.78 MiB: the graph is planned again, no tighter plan exists, and the
    backend raises BudgetError with the compiled peak as the smallest reachable. (Checkpointing alone:
    ``passes="auto"`` would stream the LM head and fit.)"""
    monkeypatch.setattr(choice, "INDUCTOR_PLAN_MARGIN", 1.0)
    model, args = _gpt()
    budget = int(9.5 * MiB)
    be = memfit.backend(budget=budget, passes=["checkpoint"])
    with pytest.raises(BudgetError) as err:
        training_step(torch.compile(model, backend=be), args)()
    e = err.value
    assert e.smallest_peak > budget and e.budget == budget
    assert "Inductor's compiled buffer plan" in str(e)
    assert not be.records  # nothing half-compiled is left behind


def test_attention_workspace_is_in_the_replayed_peak():
    """The CPU's flash attention allocates per-thread buffers inside itself; the replay adds them (measured
    per shape), so a causal attention's step replays to its measured peak to the byte (2.26 MiB). Without
    them it replayed at 1.76 MiB, and an HF GPT-2 planned for 10.97 MiB measured 260 bytes over."""
    torch.manual_seed(0)

    class Attn(torch.nn.Module):
        def __init__(self, d=128, h=4):
            super().__init__()
            self.qkv, self.h = torch.nn.Linear(d, 3 * d), h

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in self.qkv(x).split(C, dim=-1))
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum()

    model, x = Attn(), torch.randn(2, 256, 128)
    be = memfit.backend()
    meas = measure(training_step(torch.compile(model, backend=be), (x,)), repeat=1)
    (rec,) = be.records
    flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    assert any(n.target is flash_bwd for n in rec.pair.backward.graph.nodes)
    from memfit.planner.scratch import _scratch

    (node,) = [n for n in rec.pair.backward.graph.nodes if n.target is flash_bwd]
    assert _scratch(node) > 0  # its workspace, measured
    assert rec.compiled.peak_bytes == meas.peak_bytes
    assert rec.compiled.peak_bytes >= rec.analysis.memory.peak_bytes + _scratch(node)


def test_half_precision_matmul_scratch_is_in_the_replayed_peak():
    """A bf16 matmul on the CPU works in packed copies of its operands, allocated inside it. Inductor calls
    it as an extern kernel writing into a buffer it allocated (``extern_kernels.mm(..., out=buf)``), and
    the replay added scratch only to kernels that allocate their own output: a bf16-autocast HF Llama
    replayed at 7.48 MiB and measured 8.26 (the LM head's weight gradient, [4096, 512] x [512, 64] with the
    first transposed, packs 0.78 MiB), over a 7.49 MiB budget. Now each such kernel's scratch (measured
    per shape and strides) is in the replay, which equals the allocator's peak to a few bytes."""
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 4096, bias=False)
    x = torch.randn(512, 64, requires_grad=True)

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return head(x).float().pow(2).mean()

    be = memfit.backend()
    compiled = torch.compile(step, backend=be)
    meas = measure(training_step(compiled, (x,)), repeat=1)
    (rec,) = be.records
    from memfit.planner.scratch import _scratch

    mms = [n for n in rec.pair.backward.graph.nodes if n.target is torch.ops.aten.mm.default]
    assert mms and max(_scratch(n) for n in mms) > 0  # the packed copies, measured
    # effect: the replay is the measured peak (it was short by the weight gradient's packing)
    assert abs(rec.compiled.peak_bytes - meas.peak_bytes) <= 64, (rec.compiled.peak_bytes, meas.peak_bytes)
    # numerics: loss and gradients against eager
    head.zero_grad(set_to_none=True)
    x.grad = None
    loss = compiled(x)
    loss.backward()
    got = (loss.detach(), head.weight.grad.clone(), x.grad.clone())
    head.zero_grad(set_to_none=True)
    x.grad = None
    ref = step(x)
    ref.backward()
    torch.testing.assert_close(got[0], ref.detach(), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(got[1], head.weight.grad, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(got[2], x.grad, rtol=1e-2, atol=1e-3)
