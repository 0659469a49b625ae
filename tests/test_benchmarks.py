"""The acceptance benchmark (``benchmarks/acceptance.py``) runs end to end: a smoke run at its tiny size.

The real table comes from ``python benchmarks/acceptance.py`` (README); this keeps the command from
rotting: each configuration in its own process, the memfit budget derived from the compile peak, the
table written with every ratio, and a bad argument refused with exit 2.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import acceptance  # noqa: E402


@pytest.mark.slow
def test_tiny_run_writes_the_table(tmp_path):
    out = tmp_path / "acc.md"
    rc = acceptance.main(["--size", "tiny", "--models", "gpt", "--configs", "eager,compile,memfit",
                          "--repeat", "1", "--out", str(out)])
    assert rc == 0
    rows = json.loads((tmp_path / "acc.json").read_text())["gpt"]
    by = {r["config"]: r for r in rows}
    assert set(by) == {"eager", "compile", "memfit=0.8"}, by
    comp, mem = by["compile"], by["memfit=0.8"]
    assert comp["peak"] > 0 and comp["time_s"] > 0
    assert mem["budget"] == int(comp["peak"] * 0.8)  # budgets are fractions of the compile peak
    if "peak" in mem:  # a plan: predicted under the budget, measured within the margin the README states
        assert mem["predicted_peak"] <= mem["budget"] and mem["graphs"] >= 1
    else:  # no plan fits: said so, with the smallest reachable peak
        assert mem["infeasible"] and mem["smallest_peak"] > 0
    text = out.read_text()
    assert "| eager |" in text and "| compile |" in text and "memfit=0.8" in text
    assert "peak / compile" in text
    assert ("peak / checkpoint" in text) == ("peak" in mem)  # memfit against the baselines, when it ran


def test_bad_arguments_exit_2(capsys):
    for argv in (["--models", "nope"], ["--configs", "memfit"], ["--configs", "bogus"]):
        with pytest.raises(SystemExit) as e:
            acceptance.main(argv)
        assert e.value.code == 2
    assert "choose from" in capsys.readouterr().err


@pytest.mark.slow
def test_hf_benchmark_smoke_run(tmp_path):
    """``benchmarks/hf.py`` at a tiny size: compile and memfit side by side, the table with its ratios."""
    import hf as hf_bench

    out = tmp_path / "hf.md"
    assert hf_bench.main(["--family", "llama", "--layers", "1", "--width", "32", "--vocab", "4096", "--tokens", "256",
                          "--configs", "compile,memfit", "--fractions", "0.5", "--rounds", "1", "--out", str(out)]) == 0
    rows = {r["config"]: r for r in json.loads((tmp_path / "hf.json").read_text())["rows"]}
    assert set(rows) == {"compile", "memfit=0.5"}
    assert rows["memfit=0.5"]["budget"] == int(0.5 * rows["compile"]["peak"])
    assert rows["memfit=0.5"]["peak"] <= rows["memfit=0.5"]["budget"]
    assert "| memfit=0.5 (budget" in out.read_text()
    for argv in (["--configs", "memfit"], ["--fractions", "2"], ["--family", "nope"]):
        with pytest.raises(SystemExit) as e:
            hf_bench.main(argv)
        assert e.value.code == 2
