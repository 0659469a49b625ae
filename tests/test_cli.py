import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import EXAMPLES, ROOT
from memfit.cli import main


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "memfit", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_analyze_gpt_example_subprocess(tmp_path):
    out = tmp_path / "a.json"
    r = run_cli("analyze", "examples/gpt.py:small", "--json", str(out))
    assert r.returncode == 0, r.stderr
    for field in ("parameters", "saved activations", "predicted peak", "FLOPs", "largest saved activations"):
        assert field in r.stdout
    assert "h.0.mlp" in r.stdout and "gpt.py:" in r.stdout
    data = json.loads(out.read_text())
    assert data["predicted_peak_bytes"] > data["saved_activation_bytes"] > 0
    assert data["param_bytes"] > 0 and data["flops"] > data["forward_flops"] > 0
    assert len(data["largest_saved"]) == 10 and data["largest_saved"][0]["source"]
    assert len(data["timeline"]) > 100


@pytest.mark.parametrize("target", ["examples/hf_llama.py:small", "examples/mlp.py", "examples/mlp.py:small"])
def test_analyze_examples(target, capsys):
    assert main(["analyze", os.path.join(ROOT, target), "--top", "3", "--inner", "eager"]) == 0
    out = capsys.readouterr().out
    assert "predicted peak" in out and "3 largest saved activations" in out


def test_analyze_module_target(capsys, monkeypatch):
    monkeypatch.syspath_prepend(EXAMPLES)
    assert main(["analyze", "mlp:small", "--device", "h100"]) == 0
    assert "h100 profile" in capsys.readouterr().out


def _bad(tmp_path, text):
    p = tmp_path / "target.py"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize(
    "make_target, message",
    [
        (lambda t: str(t / "missing.py"), "no such file"),
        (lambda t: _bad(t, "x = 1\n"), "has no factory 'factory'"),
        (lambda t: _bad(t, "def factory():\n    raise RuntimeError('boom')\n"), "the factory raised RuntimeError: boom"),
        (lambda t: _bad(t, "import nonexistent_pkg_xyz\n"), "importing"),
        (lambda t: _bad(t, "def factory():\n    return 3\n"), "must return (model, inputs)"),
        (lambda t: _bad(t, "import torch\ndef factory():\n    return torch.nn.Linear(2, 2), (torch.randn(3, 2),)\n"), "not a scalar loss"),
        (lambda t: "no_such_module_abc", "cannot import module"),
        (lambda t: _bad(t, "factory = 3\n") + ":factory", "not callable"),
    ],
)
def test_bad_input_exit_2_one_line(tmp_path, capsys, make_target, message):
    code = main(["analyze", make_target(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l.startswith("memfit: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_bad_input_subprocess_exit_code_and_debug(tmp_path):
    target = _bad(tmp_path, "def factory():\n    raise RuntimeError('boom')\n")
    r = run_cli("analyze", target)
    assert r.returncode == 2 and "boom" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("analyze", target, "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.slow
def test_llama_7b_config_on_fake_tensors_under_two_minutes(capsys):
    t0 = time.perf_counter()
    assert main(["analyze", os.path.join(ROOT, "examples/hf_llama.py:llama_7b"), "--top", "3"]) == 0
    elapsed = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert elapsed < 120, f"7B analysis took {elapsed:.0f} s"
    # Llama-2-7B has 6.74e9 parameters: 25.1 GiB in fp32, all fake (this machine has 24 GiB)
    line = next(l for l in out.splitlines() if l.startswith("parameters"))
    assert "25.1" in line, line
    assert "GiB" in next(l for l in out.splitlines() if l.startswith("predicted peak"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["analyze", "missing.py"], "no such file: missing.py"),
        (["analyze", "no_such_module_abc"], "cannot import module"),
        (["analyze", "examples/gpt.py", "--budget", "5GiBB"], "budget='5GiBB' is not a size"),
        (["analyze", "examples/gpt.py", "--top", "-1"], "--top -1 must be >= 0"),
        (["analyze", "examples/gpt.py", "--passes", "fewbit", "--fewbit-tables", "approx_bp", "--fewbit-bits", "3"],
         "2-bit tables only"),
        (["plan", "examples/gpt.py", "--budget", "1GiB", "--passes", "checkpint"], "unknown pass 'checkpint'"),
        (["plan", "examples/gpt.py", "--budget", "1GiB", "--report", "r.txt"], "must end in .html, .md or .json"),
        (["bench", "examples/gpt.py", "--budget", "1GiB", "--repeat", "0"], "--repeat 0 must be >= 1"),
    ],
)
def test_bad_arguments_are_told_before_torch_is_imported(args, message):
    """A typo is told at once (it took 5-6 s, the time to import torch, and "tracing one training step"
    was printed before "no such file"): exit 2, one line, and torch never imported."""
    code = (
        "import sys; from memfit.cli import main; rc = main(sys.argv[1:]); "
        "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(rc)"
    )
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert r.stdout.strip() == "no torch"
    assert r.stderr.strip().splitlines() == [f"memfit: error: {r.stderr.strip().split('memfit: error: ')[1]}"]
    assert message in r.stderr and "tracing" not in r.stderr


def test_analyze_with_a_budget_shows_the_step_without_memfit_beside_the_plan(capsys):
    """The planned figures alone read as the step's (issue 21): with a plan, the step without memfit is
    printed beside it; without one, one column as before."""
    assert main(["analyze", "examples/gpt.py:small", "--inner", "eager", "--budget", "1.2MiB"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any("without memfit" in line and "planned" in line for line in out)
    peak = next(line for line in out if line.startswith("predicted peak")).split()
    assert peak[2:4] == ["1.82", "MiB"] and float(peak[4]) <= 1.2  # before, then the plan under the budget
    assert main(["analyze", "examples/gpt.py:small", "--inner", "eager"]) == 0
    assert "without memfit" not in capsys.readouterr().out


def test_analyze_a_model_with_dropout_under_inductor(tmp_path, capsys):
    """Inductor's joint-graph passes fuse the seeds of the random ops (a dropout drawn by ``rand_like``)
    under the fake mode Inductor sets; memfit runs them to see the graphs Inductor would get, and without
    that mode set every analysis of a model with dropout failed ("'NullHandler' object does not support the
    context manager protocol"). Now it is analysed, and the dropout's saved mask is a bool per element
    (64 x 512 bytes), as plain ``torch.compile`` saves it."""
    f = tmp_path / "drop.py"
    f.write_text(
        "import torch\n"
        "def factory():\n"
        "    torch.manual_seed(0)\n"
        "    model = torch.nn.Sequential(torch.nn.Linear(128, 512), torch.nn.GELU(), torch.nn.Dropout(0.1),\n"
        "                                torch.nn.Linear(512, 128))\n"
        "    return model, (torch.randn(64, 128),), lambda out: out.pow(2).mean()\n"
    )
    assert main(["analyze", str(f), "--top", "20"]) == 0
    out = capsys.readouterr().out
    # the mask: saved by a comparison (``rand_like(x) > p``) in module 2, the Dropout
    assert re.search(r"32\.00 KiB\s+gt\w*\s+2\s", out), out
