import math
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import memfit
from memfit.planner.cost import A100, H100, get_profile, node_bytes, node_flops, node_time


def _graphs(model, *args):
    be = memfit.backend(inner="eager")
    compiled = torch.compile(model, backend=be)
    compiled(*args).backward()
    return be.records[0]


def test_matmul_flops_exact_and_match_flop_counter():
    M, K, N = 24, 40, 56
    model = torch.nn.Linear(K, N, bias=False)
    x = torch.randn(M, K, requires_grad=True)
    rec = _graphs(lambda x: model(x).sum(), x)
    with FlopCounterMode(display=False) as fc:
        model(x).sum().backward()
    fw = [n for n in rec.pair.forward.graph.nodes if n.target == torch.ops.aten.mm.default]
    assert [node_flops(n) for n in fw] == [2 * M * K * N]
    mm_total = sum(c.flops for c in rec.analysis.costs if c.target == "aten.mm.default")
    assert mm_total == fc.get_total_flops() == 3 * 2 * M * K * N  # forward + dx + dw


def test_pointwise_costs_bytes_not_one_flop():
    x = torch.randn(1024, 1024, requires_grad=True)
    rec = _graphs(lambda x: torch.nn.functional.gelu(x).sum(), x)
    (gelu,) = [n for n in rec.pair.forward.graph.nodes if n.target == torch.ops.aten.gelu.default]
    assert node_bytes(gelu) == 2 * 1024 * 1024 * 4  # reads x, writes the result
    # on an H100 a 4 MiB-in, 4 MiB-out GELU is memory bound: bytes / bandwidth (+ launch)
    assert node_time(gelu, H100) == pytest.approx(8 * 2**20 / H100.bandwidth + H100.launch_s)
    views = [n for n in rec.pair.backward.graph.nodes if n.target == torch.ops.aten.expand.default]
    assert views and all(node_time(n, H100) == 0 for n in views)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cpu_flash_attention_is_priced_by_its_products(kv_heads):
    """The CPU's flash attention (what ``scaled_dot_product_attention`` traces to on CPU, grouped-query
    included) costs its two products forward and four backward, not one FLOP per output element: so
    priced, a 2-layer GPT's attentions (7.2 ms of a 38.5 ms step) were priced as their memory traffic alone."""
    B, H, S, D = 2, 4, 64, 16

    def attn(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                enable_gqa=kv_heads != H).sum()

    q = torch.randn(B, H, S, D, requires_grad=True)
    k = torch.randn(B, kv_heads, S, D, requires_grad=True)
    v = torch.randn(B, kv_heads, S, D, requires_grad=True)
    rec = _graphs(attn, q, k, v)
    nodes = [n for g in (rec.pair.forward, rec.pair.backward) for n in g.graph.nodes
             if "flash_attention_for_cpu" in str(n.target)]
    fwd = [n for n in nodes if "backward" not in str(n.target)]
    bwd = [n for n in nodes if "backward" in str(n.target)]
    assert len(fwd) == len(bwd) == 1, [str(n.target) for n in nodes]
    products = 2 * B * H * S * S * (D + D)  # q @ k^T and p @ v: every query head against every key
    assert node_flops(fwd[0]) == products
    assert node_flops(bwd[0]) == 2 * products
    # compute bound on an H100 at these FLOPs: priced by them, not by the bytes moved
    assert node_time(bwd[0], H100) >= 2 * products / H100.peak_flops(torch.float32)


def test_matmul_is_compute_bound_on_gpu_profiles():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    n = 4096
    with FakeTensorMode() as mode:
        a, b = torch.empty(n, n), torch.empty(n, n)
        gm = make_fx(torch.mm)(a, b)
    (mm,) = [x for x in gm.graph.nodes if x.op == "call_function"]
    assert node_flops(mm) == 2 * n**3
    for prof in (H100, A100):
        assert node_time(mm, prof) == pytest.approx(2 * n**3 / prof.peak_flops(torch.float32) + prof.launch_s)
    del mode


def test_profiles():
    assert get_profile("h100") is H100 and get_profile("a100") is A100
    cpu = get_profile("cpu")
    assert cpu.name == "cpu" and cpu.peak_flops(torch.float32) > 1e8 and cpu.bandwidth > 1e8
    assert get_profile(None).name == "cpu"
    assert H100.peak_flops(torch.bfloat16) > A100.peak_flops(torch.bfloat16)
    with pytest.raises(ValueError, match="tpu"):
        get_profile("tpu")


def test_cpu_calibration_is_cached_per_machine(tmp_path, monkeypatch):
    """The first process on a machine measures and writes the profile; later ones read the same numbers
    (so the planner's choices do not move between runs); MEMFIT_RECALIBRATE=1 measures again."""
    from memfit.planner.cost import _cpu_profile_path, calibrate_cpu

    monkeypatch.setenv("MEMFIT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MEMFIT_RECALIBRATE", raising=False)
    monkeypatch.setattr("memfit.planner.cost.CALIBRATION_SPREAD", math.inf)  # cached however busy the machine
    monkeypatch.setattr("memfit.planner.cost.CALIBRATION_RUNS", 1)  # the spread has its own test
    calibrate_cpu.cache_clear()
    first = calibrate_cpu()
    path = _cpu_profile_path()
    assert path.startswith(str(tmp_path)) and os.path.exists(path)
    calibrate_cpu.cache_clear()  # a new process, as far as the cache is concerned
    again = calibrate_cpu()
    assert again == first and again is not first
    with open(path, "w") as f:
        f.write("not json")  # a damaged file is measured over, not trusted
    calibrate_cpu.cache_clear()
    assert calibrate_cpu().bandwidth > 0
    monkeypatch.setenv("MEMFIT_RECALIBRATE", "1")
    calibrate_cpu.cache_clear()
    fresh = calibrate_cpu()
    assert fresh.bandwidth > 0 and fresh.peak_flops(torch.float32) > 0
    calibrate_cpu.cache_clear()


def test_cpu_calibration_is_real_inside_a_compile(monkeypatch):
    """Calibration first runs inside a compile (under FakeTensorMode); it must time real kernels."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memfit.planner.cost import calibrate_cpu

    monkeypatch.setenv("MEMFIT_RECALIBRATE", "1")  # measure here, not read an earlier process's file
    calibrate_cpu.cache_clear()
    with FakeTensorMode():
        prof = calibrate_cpu()
    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    import time

    t0 = time.perf_counter()
    torch.mm(a, b)
    measured = 2 * n**3 / (time.perf_counter() - t0)
    # a fake matmul reports ~20x the real rate; a real calibration lands within noise of a real run
    assert prof.peak_flops(torch.float32) < 5 * measured


@pytest.mark.parametrize("bad", [
    {"fp32_flops": 0.0}, {"bandwidth": float("nan")}, {"launch_s": -1e-6}, {"slowdown": {"fewbit_pack": 0.5}},
])
def test_a_cached_profile_that_no_calibration_produces_is_measured_over(tmp_path, monkeypatch, bad):
    """Zeros (ZeroDivisionError in the cost model), NaN (HiGHS refused it), negative rates (negative
    times), a slowdown under 1: the file is discarded, the CPU measured again and the file replaced."""
    import json
    import math

    from memfit.planner.cost import _cpu_profile_path, calibrate_cpu

    monkeypatch.setenv("MEMFIT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MEMFIT_RECALIBRATE", raising=False)
    monkeypatch.setattr("memfit.planner.cost.CALIBRATION_SPREAD", math.inf)
    monkeypatch.setattr("memfit.planner.cost.CALIBRATION_RUNS", 1)
    calibrate_cpu.cache_clear()
    good = calibrate_cpu()
    path = _cpu_profile_path()
    with open(path) as f:
        d = json.load(f)
    d.update(bad)
    with open(path, "w") as f:
        json.dump(d, f)
    calibrate_cpu.cache_clear()
    try:
        prof = calibrate_cpu()
    finally:
        calibrate_cpu.cache_clear()
    rates = (prof.peak_flops(torch.float32), prof.bandwidth, prof.launch_s)
    assert all(math.isfinite(r) and r > 0 for r in rates), rates
    assert all(v >= 1 for v in prof.slowdown.values()) and prof.slowdown.keys() == good.slowdown.keys()
    with open(path) as f:
        again = json.load(f)
    assert all(math.isfinite(again[k]) and again[k] > 0 for k in ("fp32_flops", "bandwidth", "launch_s"))


def test_a_noisy_calibration_is_used_but_not_cached(tmp_path, monkeypatch):
    """Runs that disagree (a busy machine: 17.7, 173.9, 17.2 GFLOP/s back to back) give the best run's
    rates to this process and leave no file, so the next process measures again; runs that agree are
    cached."""
    from memfit.planner import cost

    monkeypatch.setenv("MEMFIT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MEMFIT_RECALIBRATE", raising=False)
    rates = iter([17.7e9, 173.9e9, 17.2e9, 20.0e9, 21.0e9, 20.5e9])
    monkeypatch.setattr(cost, "_calibrate_cpu", lambda: cost._cpu_profile(next(rates), 5e9, 1e-6, {"fewbit_pack": 2.0}))
    cost.calibrate_cpu.cache_clear()
    try:
        noisy = cost.calibrate_cpu()
        assert noisy.peak_flops(torch.float32) == 173.9e9 and not os.path.exists(cost._cpu_profile_path())
        cost.calibrate_cpu.cache_clear()
        calm = cost.calibrate_cpu()
        assert calm.peak_flops(torch.float32) == 21.0e9 and os.path.exists(cost._cpu_profile_path())
    finally:
        cost.calibrate_cpu.cache_clear()


def test_profiles_written_at_once_leave_one_whole_file(tmp_path, monkeypatch):
    """Two writers at once (two processes calibrating on one machine) and a reader between them: each
    write goes to its own temporary file and replaces the profile in one step, so a reader sees a whole
    profile or none, and no temporary file is left."""
    import json
    import threading

    from memfit.planner import cost

    monkeypatch.setenv("MEMFIT_CACHE_DIR", str(tmp_path))
    path = cost._cpu_profile_path()
    profiles = [cost._cpu_profile(1e10 * (i + 1), 5e9, 1e-6, {"fewbit_pack": 2.0}) for i in range(2)]
    seen, stop = [], threading.Event()

    def write(prof):
        for _ in range(200):
            cost._write_cpu_profile(path, prof)

    def read():
        while not stop.is_set():
            if os.path.exists(path):  # once it exists, every read finds a whole profile
                seen.append(cost._read_cpu_profile(path) is not None)

    # the temporary name is per process: two threads of one process stand in for two processes here
    pids = iter([1001, 1002])
    monkeypatch.setattr(cost.os, "getpid", lambda: threading.current_thread().memfit_pid)
    writers = []
    for prof in profiles:
        t = threading.Thread(target=write, args=(prof,))
        t.memfit_pid = next(pids)
        writers.append(t)
    reader = threading.Thread(target=read)
    reader.memfit_pid = 0
    reader.start()
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    reader.join()
    assert seen and all(seen)
    assert os.listdir(tmp_path) == [os.path.basename(path)]
    with open(path) as f:
        assert json.load(f)["fp32_flops"] in (1e10, 2e10)


def test_tests_do_not_touch_the_users_cache():
    from memfit.planner.cost import _cpu_profile_path

    home = os.path.join(os.path.expanduser("~"), ".cache", "memfit")
    assert not _cpu_profile_path().startswith(home), _cpu_profile_path()

