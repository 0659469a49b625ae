"""Pipeline planning: the schedule and per-stage checkpoint plan of least simulated step time within a
per-stage budget; ``memfit plan --pipeline-stages`` on a real example, its report and its refusals."""

from __future__ import annotations

import json

import pytest

from memfit.cli import EXIT_BAD_INPUT, EXIT_DOES_NOT_FIT, EXIT_OK, main
from memfit.planner.pipeline import StageOption, plan
from memfit.planner.schedule import StageCosts, simulate

MB = 1000
NONE = StageOption("no checkpointing", StageCosts(1.0, 1.0, 1.0, mem_f=MB, mem_w=MB))
CKPT = StageOption("checkpointing", StageCosts(1.0, 1.6, 1.0, mem_f=MB // 4, mem_w=MB // 4), recompute_s=0.6)


def test_plan_chooses_the_fastest_schedule_that_fits():
    p, m = 4, 8
    free = plan([NONE, CKPT], p, m)
    # no budget: the fastest of all pairs (ZB-V and ZB-H2 have no bubble at equal times; ZB-V less memory)
    assert free.chosen.step_time == min(c.step_time for c in free.considered)
    assert free.chosen.name == "ZB-V" and free.option is NONE
    # 1F1B's memory (p microbatches) but not ZB-H2's: still ZB-V, not checkpointing
    at_1f1b = plan([NONE, CKPT], p, m, budget=p * MB)
    assert (at_1f1b.chosen.name, at_1f1b.option) == ("ZB-V", NONE)
    # half of that: a schedule that holds fewer microbatches (V-Half: (p+2)//2 = 3) or checkpointing, whichever
    # the simulation says is faster; the choice is the fastest fitting pair, and every faster pair is over
    half = plan([NONE, CKPT], p, m, budget=3 * MB)
    assert half.fits and max(half.chosen.peak_bytes) <= 3 * MB
    assert all(not c.fits for c in half.considered if c.step_time < half.chosen.step_time - 1e-12)
    assert half.chosen.step_time == pytest.approx(
        min(simulate(c.schedule, [(NONE if c.option == NONE.label else CKPT).costs] * p, m).step_time
            for c in half.considered if c.fits))
    # below every schedule's peak without checkpointing: only checkpointed plans fit
    tight = plan([NONE, CKPT], p, m, budget=MB)
    assert tight.option is CKPT
    # the verdict compares with 1F1B without checkpointing, whatever was chosen
    assert (tight.baseline.schedule, tight.baseline.option) == ("1F1B", NONE.label)
    assert tight.baseline.step_time == pytest.approx(simulate("1F1B", [NONE.costs] * p, m).step_time)
    assert "the speed of 1F1B with no checkpointing" in tight.verdict()
    # below everything: refused with the smallest reachable peak (V-Min with checkpointing: 2 x MB/4)
    refused = plan([NONE, CKPT], p, m, budget=100)
    assert not refused.fits and refused.chosen is None
    assert refused.smallest_peak == 2 * (MB // 4)
    assert "does not fit" in refused.verdict()


def test_plan_leaves_out_what_does_not_apply():
    r = plan([NONE], 4, 6)
    assert all(c.schedule != "1F1B-I" for c in r.considered) and any("1F1B-I left out" in n for n in r.notes)
    with pytest.raises(ValueError, match="at least 2 stages"):
        plan([NONE], 1, 4)


def test_cli_plans_a_pipeline_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "pp.html"
    rc = main(["plan", "examples/gpt.py", "--pipeline-stages", "4", "--microbatches", "8", "--budget", "40MiB",
               "--comm-ms", "0.5", "--report", str(out)])
    text = capsys.readouterr().out
    assert rc == EXIT_OK, text
    data = json.loads((tmp_path / "pp.json").read_text())
    assert data["fits"] and data["stages"] == 4 and data["microbatches"] == 8
    chosen = data["chosen"]
    assert chosen["schedule"] in text.splitlines()[0]
    assert max(chosen["peak_bytes_per_rank"]) - chosen["stage_costs"]["resident"] <= 40 * 2**20
    # every schedule was weighed, with and without checkpointing
    assert {c["schedule"] for c in data["considered"]} == {"1F1B", "1F1B-I", "ZB-H1", "ZB-H2", "ZB-V", "V-Half", "V-Min"}
    assert {c["option"] == "no checkpointing" for c in data["considered"]} == {True, False}
    # with checkpointing, W holding B's recomputed values or recomputing them itself (less held, more W time)
    held = {c["option"] for c in data["considered"] if c["option"].endswith("W holds")}
    again = {c["option"] for c in data["considered"] if c["option"].endswith("W recomputes")}
    assert held and len(held) == len(again)
    # the chosen is the fastest that fits
    fitting = [c for c in data["considered"] if c["fits"]]
    assert chosen["step_time_s"] == pytest.approx(min(c["step_time"] for c in fitting))
    # the timeline holds every op of every microbatch, ranks x time
    ops = [op for rank in chosen["timeline"] for op in rank]
    n_virtual = len({(op[1]) for op in ops})
    assert len({(op[0], op[1], op[2]) for op in ops}) == len(ops)
    assert len([op for op in ops if op[0] == "F"]) == 8 * n_virtual
    html = out.read_text()
    assert html.count("<svg") == 2 and "Schedules considered" in html
    assert "Not modelled" in (tmp_path / "pp.md").read_text()


@pytest.mark.parametrize("argv,msg", [
    (["--pipeline-stages", "1", "--budget", "1GiB"], "must be >= 2"),
    (["--pipeline-stages", "4", "--device-memory", "80GB"], "per-stage --budget"),
    (["--pipeline-stages", "4", "--budget", "1GiB", "--microbatches", "0"], "--microbatches 0"),
    (["--budget", "1GiB", "--microbatches", "8"], "add --pipeline-stages"),
])
def test_cli_pipeline_bad_input(argv, msg, capsys):
    assert main(["plan", "examples/gpt.py", *argv]) == EXIT_BAD_INPUT
    assert msg in capsys.readouterr().err


def test_cli_pipeline_refusal(tmp_path, capsys):
    rc = main(["plan", "examples/mlp.py", "--pipeline-stages", "2", "--budget", "1KiB"])
    captured = capsys.readouterr()
    assert rc == EXIT_DOES_NOT_FIT
    assert "does not fit" in captured.out and "smallest per-stage activation peak" in captured.out
