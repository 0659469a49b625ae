import json
import os
import subprocess
import sys

import pytest
import torch

import memfit
from helpers import assert_matches_eager, build, loss_and_grads


@pytest.mark.parametrize("name", ["mlp", "gpt", "llama"])
def test_eager_inner_matches_eager(name):
    be = memfit.backend(inner="eager", passes=[])
    assert_matches_eager(name, be)
    # structure: one training graph, partitioned by the default partitioner, with a backward
    assert len(be.records) == 1
    rec = be.records[0]
    assert rec.partition == "default" and rec.pair.backward is not None
    assert rec.analysis.memory.saved_bytes > 0


@pytest.mark.parametrize("name", ["mlp", "gpt", "llama"])
def test_inductor_inner_matches_eager(name):
    be = memfit.backend()  # inner="inductor" by default
    # Inductor fuses and reorders reductions: fp32 rounding differences up to ~1e-5 relative
    assert_matches_eager(name, be, rtol=2e-5, atol=2e-6)
    assert len(be.records) == 1 and be.records[0].partition == "mincut"


def test_registered_name_with_options_matches_eager(tmp_path):
    report = tmp_path / "report.json"
    model, args, kwargs = build("mlp")
    ref_loss, ref_grads = loss_and_grads(model, args, kwargs)
    compiled = torch.compile(model, backend="memfit", options={"inner": "eager", "report": str(report)})
    loss, grads = loss_and_grads(compiled, args, kwargs)
    torch.testing.assert_close(loss, ref_loss)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k])
    data = json.loads(report.read_text())
    assert data["options"]["inner"] == "eager"
    (g,) = data["graphs"]
    assert g["analysis"]["predicted_peak_bytes"] > 0
    assert g["analysis"]["largest_saved"][0]["bytes"] > 0


def test_no_grad_goes_straight_to_inner():
    be = memfit.backend(inner="eager")
    model, args, _ = build("mlp")
    compiled = torch.compile(model, backend=be)
    with torch.no_grad():
        out = compiled(*args)
        ref = model(*args)
    torch.testing.assert_close(out, ref)
    assert be.inference_graphs == 1 and be.records == []


def test_budget_over_prediction_warns_not_silent():
    be = memfit.backend(inner="eager", budget=1024, passes=[])  # no pass may reduce it
    model, args, _ = build("mlp")
    with pytest.warns(UserWarning, match="over the budget"):
        torch.compile(model, backend=be)(*args).backward()
    assert any("over the budget" in n for n in be.records[0].notes)
    assert any("no memory pass enabled" in n for n in be.records[0].notes)


def test_entry_point_works_without_importing_memfit():
    code = (
        "import sys, torch\n"
        "m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))\n"
        "x = torch.randn(4, 8)\n"
        "c = torch.compile(m, backend='memfit', options={'inner': 'eager'})\n"
        "c(x).sum().backward()\n"
        "assert 'memfit' in sys.modules, 'the entry point should have loaded memfit'\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok")


def test_plain_inductor_cache_does_not_bypass_memfit():
    """A graph that plain torch.compile compiled (and cached) first still goes through memfit."""
    model, args, _ = build("mlp")
    torch.compile(model)(*args).backward()
    torch._dynamo.reset()
    be = memfit.backend()
    torch.compile(model, backend=be)(*args).backward()
    assert len(be.records) == 1 and be.records[0].partition == "mincut"


def test_bf16_autocast_and_frozen_params_match_eager():
    """Autocast (bf16) and parameters that do not require grad (LoRA-style) take the same path."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    model[0].weight.requires_grad_(False)
    ref = __import__("copy").deepcopy(model)
    be = memfit.backend(inner="eager")
    compiled = torch.compile(model, backend=be)
    x = torch.randn(16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compiled(x).float().pow(2).mean().backward()
        ref(x).float().pow(2).mean().backward()
    assert model[0].weight.grad is None
    for p, q in zip(model.parameters(), ref.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad)
    bf16 = [b for b in be.records[0].analysis.memory.saved if b.nbytes == 16 * 64 * 2]
    assert bf16, "expected a bf16 activation among the saved values"


def test_shared_backend_forgets_a_deleted_models_parameters():
    """``backend="memfit"`` shares one backend per set of options. With ``device_memory``, what is resident
    is the parameters of models still alive: after the first model is deleted, the second gets the budget
    a fresh backend gives it (before, 8 MiB of the first model's parameters stayed counted)."""
    import gc

    from memfit.compiler.backend import _shared

    opts = {"device_memory": "20MiB", "inner": "eager", "passes": []}

    def compile_one(width):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, width))
        torch.compile(model, backend="memfit", options=opts)(torch.randn(8, width)).sum().backward()
        return model

    def nbytes(model):
        return sum(p.numel() * p.element_size() for p in model.parameters())

    first = compile_one(1024)
    (be,) = [b for o, b in _shared.items() if o.device_memory == 20 * 2**20 and o.passes == ()]
    assert sum(be.param_bytes.values()) == nbytes(first) > 8 * 10**6
    del first
    torch._dynamo.reset()
    gc.collect()
    second = compile_one(256)
    assert sum(be.param_bytes.values()) == nbytes(second)
    assert be.step_budget().budget == 20 * 2**20 - nbytes(second)
