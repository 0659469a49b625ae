"""Pipeline schedule simulator: published bubble rates for equal times, memory, the schedule choice."""

from __future__ import annotations

import pytest

from memfit.planner.schedule import SCHEDULES, StageCosts, choose, simulate

SHAPES = [(2, 4), (3, 7), (4, 8), (4, 12), (8, 16)]


@pytest.mark.parametrize("p,m", SHAPES)
def test_1f1b_bubble_rate_is_published_formula(p, m):
    r = simulate("1F1B", [StageCosts(1.0, 1.0, 1.0)] * p, m)
    assert r.bubble_rate == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
    assert r.step_time == pytest.approx(3 * (m + p - 1), abs=1e-9)  # (m+p-1)(T_F+T_B+T_W)
    assert r.idle[0] == pytest.approx(3 * (p - 1), abs=1e-9)


@pytest.mark.parametrize("p,m", SHAPES)
def test_zb_h1_bubble_is_a_third_of_1f1b(p, m):
    c = [StageCosts(1.0, 1.0, 1.0)] * p
    base, h1 = simulate("1F1B", c, m), simulate("ZB-H1", c, m)
    # idle per stage (p-1)(T_F+T_B-T_W): a third of 1F1B's (p-1)(T_F+T_B+T_W)
    assert max(h1.idle) == pytest.approx(p - 1, abs=1e-9)
    assert max(h1.idle) * 3 == pytest.approx(max(base.idle), abs=1e-9)
    # as a share of 1F1B's step: B/3 with B = (p-1)/(m+p-1)
    assert max(h1.idle) / base.step_time == pytest.approx((p - 1) / (m + p - 1) / 3, abs=1e-12)


@pytest.mark.parametrize("p,m", SHAPES)
def test_zb_h2_has_no_bubble(p, m):
    r = simulate("ZB-H2", [StageCosts(1.0, 1.0, 1.0)] * p, m)
    assert r.bubble_rate == pytest.approx(0.0, abs=1e-12)
    assert max(r.idle) == pytest.approx(0.0, abs=1e-9)


def test_zb_v_beats_1f1b_and_h1_with_equal_times():
    p, m = 4, 8
    c = [StageCosts(1.0, 1.0, 1.0)] * p
    v = simulate("ZB-V", c, m)
    assert v.bubble_rate < simulate("ZB-H1", c, m).bubble_rate < simulate("1F1B", c, m).bubble_rate
    # every op of every microbatch ran once, on the rank that holds its chunk
    ops = [op for rank in v.order for op in rank]
    assert len(ops) == len(set(ops)) == 3 * m * 2 * p
    assert {op.stage for op in v.order[0]} == {0, 2 * p - 1}


def test_orders_respect_dependencies_and_memory():
    p, m = 4, 8
    c = [StageCosts(1.0, 1.2, 0.8, mem_f=100, mem_w=60, resident=1000)] * p
    for name in SCHEDULES:
        r = simulate(name, c, m)
        for rank in r.order:
            seen_f, seen_b = set(), set()
            for op in rank:
                if op.kind == "F":
                    seen_f.add((op.stage, op.mb))
                elif op.kind in ("B", "BW"):
                    assert (op.stage, op.mb) in seen_f
                    seen_b.add((op.stage, op.mb))
                else:
                    assert (op.stage, op.mb) in seen_b
    # 1F1B keeps p-s microbatches' activations on stage s
    base = simulate("1F1B", c, m)
    assert base.peak_bytes == tuple(1000 + 100 * (p - s) for s in range(p))
    # ZB-H2 keeps more in flight than ZB-H1 on the first stage
    assert simulate("ZB-H2", c, m).peak_bytes[0] > simulate("ZB-H1", c, m).peak_bytes[0] - 1


def test_communication_delays_the_step():
    c = [StageCosts(1.0, 1.0, 1.0)] * 4
    assert simulate("1F1B", c, 8, comm=0.1).step_time > simulate("1F1B", c, 8).step_time


def test_choose_picks_the_fastest_that_fits():
    p, m = 4, 8
    c = [StageCosts(1.0, 1.0, 1.0, mem_f=100, mem_w=60, resident=0)] * p
    best, results = choose(c, m)
    assert best is results[0] and best.step_time == min(r.step_time for r in results)
    one_f1b = simulate("1F1B", c, m)
    best, _ = choose(c, m, budget=max(one_f1b.peak_bytes))
    assert best is not None and best.fits(max(one_f1b.peak_bytes))
    assert best.step_time <= one_f1b.step_time
    best, _ = choose(c, m, budget=50)
    assert best is None


def test_bad_input():
    with pytest.raises(ValueError, match="unknown schedule"):
        simulate("ZB-H3", [StageCosts(1, 1, 1)], 2)
    with pytest.raises(ValueError, match="at least one"):
        simulate("1F1B", [StageCosts(1, 1, 1)], 0)
