"""examples/train_gpt.py: a short run under a budget trains like eager, with a checkpoint plan and a lower peak."""

import json

import pytest

import train_gpt  # examples/ is on sys.path (conftest.py)

TINY = ["--batch", "8", "--seq", "32", "--layers", "4", "--width", "32", "--inner", "eager"]


def test_train_example_matches_eager_under_budget(tmp_path, capsys):
    png, js = tmp_path / "loss.png", tmp_path / "loss.json"
    rc = train_gpt.main(["--steps", "30", *TINY, "--plot", str(png), "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0, out
    res = json.loads(js.read_text())
    eager, fitted = res["eager"], res["memfit"]

    # the curves: same length, within the tolerance at every step (inner=eager: recomputation repeats the
    # same kernels on the same inputs, so the tolerance is 1e-5 throughout)
    assert len(eager["loss"]) == len(fitted["loss"]) == 30
    assert res["match"] and res["first_step_over"] is None
    assert res["rtol"] == res["early_rtol"] == 1e-5
    for e, m in zip(eager["loss"], fitted["loss"]):
        assert abs(m - e) <= 1e-5 * abs(e)
    # training happened: the loss fell (from ~ln 21 = 3.04)
    assert fitted["loss"][-1] < fitted["loss"][0] - 0.3

    # structure: the budget is 60% of the unplanned prediction, below it, so memfit carried out a checkpoint plan
    assert res["budget"] == int(0.6 * res["predicted_unplanned_peak"])
    assert res["checkpoint_planned"]
    plans = [g["plan"] for g in res["graphs"] if g["plan"] is not None]
    assert plans and all(p["recomputed"] > 0 and p["predicted_peak"] <= res["budget"] for p in plans)

    # effect: memfit's measured step peak is under the budget (2% slack) and below eager's
    assert fitted["peak_bytes"] <= 1.02 * res["budget"]
    assert fitted["peak_bytes"] < eager["peak_bytes"]

    # the plot is a PNG of a plausible size
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    import matplotlib.image

    h, w = matplotlib.image.imread(str(png)).shape[:2]
    assert h > 300 and w > 300

    assert "checkpoint plan" in out and "peak of one step" in out


def test_train_example_budget_too_small(tmp_path, capsys):
    rc = train_gpt.main(["--steps", "2", *TINY, "--budget", "64KiB", "--plot", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 3
    assert "the budget 64.00 KiB is too small" in err and "at best; give a budget of at least" in err
    assert "--budget-fraction" in err  # the smallest workable fraction of the unplanned peak
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("bad", [["--steps", "0"], ["--budget", "lots"], ["--width", "30"]])
def test_train_example_bad_arguments(bad):
    with pytest.raises(SystemExit) as e:
        train_gpt.parse_args(bad)
    assert e.value.code == 2
