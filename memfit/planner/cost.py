"""Cost model: FLOPs and bytes per FX node, and a roofline time estimate per device profile.

Why a roofline and not FLOPs alone: PyTorch's ``activation_memory_budget`` costs every pointwise op
as 1 FLOP, so recomputing a GELU over a [8, 1024, 16384] tensor (512 MiB moved in fp32) looks free.
On an H100 that is ~0.3 ms of HBM traffic, comparable to a 4k x 4k x 4k fp32 matmul (~2 ms at
67 TFLOP/s). Here a node costs ``max(flops / peak_flops, bytes / bandwidth) + launch`` where bytes are
what the node reads and writes (views move nothing).

FLOPs come from ``torch.utils.flop_counter``'s registry (matmuls, convolutions, attention) and
:data:`_ATTENTION_FLOPS` (the CPU's flash attention, which that registry lacks); every other op counts one
FLOP per output element, which only matters for the compute side of the max.
"""

from __future__ import annotations

import functools
import json
import math
import operator
import os
import re
import time
from dataclasses import dataclass, field

import torch
import torch.fx
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry


@dataclass(frozen=True)
class DeviceProfile:
    """Peak rates of one device. Figures are vendor datasheet numbers (dense, no sparsity)."""

    name: str
    flops: dict = field(hash=False)
    """Peak FLOP/s per dtype (``torch.float32`` etc.); the matmul units' rate where they apply."""
    bandwidth: float
    """Memory bandwidth in bytes/s."""
    launch_s: float = 0.0
    """Fixed cost per node (kernel launch or Python dispatch)."""
    alloc_granularity: int = 1
    """The allocator rounds every block up to this (CUDA caching allocator: 512 bytes)."""
    memory: int | None = None
    """Device memory in bytes, where known."""
    slowdown: dict = field(default_factory=dict, hash=False)
    """Measured time over roofline time of memfit's own ops (by op name) where their kernel is far from
    the roofline: on CPU the few-bit ops run their torch reference (bucketize, shifts, gathers: about 3 ns
    per element on a 2-core CPU), 39x (fewbit_pack) and 46x (fewbit_grad) the roofline at the calibrated
    bandwidth (48 GB/s, a cache-resident copy). Without it the planner chose few-bit + checkpoint for a GELU
    MLP at a predicted 3% less time than checkpoint alone, which measured 728 ms against 477 ms. Missing: 1
    (the Triton kernels on a GPU are single-pass; not measured here)."""

    stream_factor: tuple[float, float] = (1.0, 1.0)
    """Measured over modelled time of a stream op's chunk graphs: (compiled chunk graphs, eager ones). Their
    many small kernels run further from the roofline than the unstreamed step's (on CPU 1.8x against
    about 1.2x). See :data:`CPU_STREAM_FACTOR`. 1: no measurement (a GPU profile)."""
    stream_node_s: float = 0.0
    """Fixed cost per node of an eager chunk graph per chunk, beyond ``launch_s`` (see :data:`CPU_STREAM_NODE`)."""
    stream_chunk_s: float = 0.0
    """Fixed cost per chunk of an Inductor-compiled chunk graph, per input and per kernel that is not a
    fused pointwise op: the runtime slices each input, and each kernel is called (see
    :data:`CPU_STREAM_CHUNK_UNIT`)."""

    def peak_flops(self, dtype: torch.dtype) -> float:
        return self.flops.get(dtype, self.flops[torch.float32])


_GiB = 2**30

# H100 SXM5 80GB: 989 TFLOP/s bf16/fp16 dense, 495 TF32 (what fp32 matmuls use with
# allow_tf32; we take the plain-fp32 67 TFLOP/s since PyTorch's default is highest precision),
# 3.35 TB/s HBM3.
H100 = DeviceProfile(
    name="h100",
    flops={torch.float32: 67e12, torch.bfloat16: 989e12, torch.float16: 989e12, torch.float64: 34e12},
    bandwidth=3.35e12,
    launch_s=4e-6,
    alloc_granularity=512,
    memory=80 * _GiB,
)
# A100 SXM4 80GB: 312 TFLOP/s bf16/fp16 dense, 19.5 TFLOP/s fp32, 2.04 TB/s HBM2e.
A100 = DeviceProfile(
    name="a100",
    flops={torch.float32: 19.5e12, torch.bfloat16: 312e12, torch.float16: 312e12, torch.float64: 9.7e12},
    bandwidth=2.04e12,
    launch_s=4e-6,
    alloc_granularity=512,
    memory=80 * _GiB,
)


def _time_it(fn, repeat: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.lru_cache(maxsize=1)
def calibrate_cpu() -> DeviceProfile:
    """Measure this CPU's matmul rate and copy bandwidth (about 0.6 s), once per machine.

    A 512x512x512 fp32 matmul and a 32 MiB copy are big enough to leave the caches' best case and
    small enough to finish quickly on a 2-core machine. Each calibration takes the best of 5 timings,
    and the profile is the best of ``CALIBRATION_RUNS`` calibrations; when they disagree by more than
    ``CALIBRATION_SPREAD`` the machine was busy, and the result is used but not cached.

    The result is kept in ``$MEMFIT_CACHE_DIR`` (default ``~/.cache/memfit``), per host, torch version
    and thread count, and read back by later processes: measured afresh in each process, the rates
    moved enough between runs that the checkpoint planner chose a different plan for the same graph
    and budget each time (a 2-layer GPT: three runs, three plans; with the fixed H100 profile, one).
    ``MEMFIT_RECALIBRATE=1`` measures again (and replaces the file).
    """
    path = _cpu_profile_path()
    if os.environ.get("MEMFIT_RECALIBRATE") != "1":
        cached = _read_cpu_profile(path)
        if cached is not None:
            return cached
    # It is first called from inside a compile, under FakeTensorMode: without leaving the modes,
    # the "matmul" is fake and instant (we saw 2.6e12 FLOP/s on a 2-core CPU that does 1.3e11).
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes(), torch.no_grad():
        runs = [_calibrate_cpu() for _ in range(CALIBRATION_RUNS)]
    prof = _best(runs)
    spread = max(_spread([r.flops[torch.float32] for r in runs]), _spread([r.bandwidth for r in runs]))
    if spread <= CALIBRATION_SPREAD:
        _write_cpu_profile(path, prof)
    # else: the machine was busy while measuring; this process uses the best run, the next measures again
    return prof


#: Calibrations per measurement, each a best of 5 timings; the best of them is the profile.
CALIBRATION_RUNS = 3
#: Largest max/min ratio of the runs' matmul rates (and of their bandwidths) for the profile to be cached.
#: Three calibrations back to back on a busy 2-core machine gave 17.7, 173.9 and 17.2 GFLOP/s; the one
#: cached was whichever came first, and later processes planned with it for good.
CALIBRATION_SPREAD = 1.5


def _spread(values: list[float]) -> float:
    return max(values) / min(values) if min(values) > 0 else math.inf


def _best(runs: list[DeviceProfile]) -> DeviceProfile:
    """The fastest rates seen (a busy neighbour only ever slows a measurement down)."""
    fp32 = max(r.flops[torch.float32] for r in runs)
    bandwidth = max(r.bandwidth for r in runs)
    launch = min(r.launch_s for r in runs)
    slowdown = {k: min(r.slowdown[k] for r in runs) for k in runs[0].slowdown}
    return _cpu_profile(fp32, bandwidth, launch, slowdown)


def _cpu_profile_path() -> str:
    import platform

    root = os.environ.get("MEMFIT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "memfit")
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", platform.node() or "host")
    return os.path.join(root, f"cpu-profile-{host}-torch{torch.__version__}-{torch.get_num_threads()}threads.json")


def _read_cpu_profile(path: str) -> DeviceProfile | None:
    """The cached profile, or None (measure again, and replace the file) when there is none or it is not
    one a calibration can produce: every rate finite and positive, every slowdown at least 1. A cache
    holding zeros made every compile fail in the cost model (ZeroDivisionError), NaN in HiGHS, negative
    rates gave negative time estimates; a file is never trusted over a measurement."""
    try:
        with open(path) as f:
            d = json.load(f)
        rates = float(d["fp32_flops"]), float(d["bandwidth"]), float(d["launch_s"])
        slowdown = {str(k): float(v) for k, v in d["slowdown"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # no file, or not one of ours: measure
    if not all(math.isfinite(r) and r > 0 for r in rates) or not all(
        math.isfinite(v) and v >= 1 for v in slowdown.values()
    ):
        return None
    return _cpu_profile(*rates, slowdown)


def _write_cpu_profile(path: str, prof: DeviceProfile) -> None:
    d = {
        "fp32_flops": prof.flops[torch.float32],
        "bandwidth": prof.bandwidth,
        "launch_s": prof.launch_s,
        "slowdown": dict(prof.slowdown),
    }
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(d, f)
        os.replace(tmp, path)  # atomic: a process reading it never sees half a file
    except OSError:
        pass  # a read-only home: every process measures, as before


def _calibrate_cpu() -> DeviceProfile:
    n = 512
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    t_mm = _time_it(lambda: torch.mm(a, b))
    fp32 = 2 * n**3 / t_mm
    src = torch.empty(8 * 2**20)  # 32 MiB
    dst = torch.empty_like(src)
    t_copy = _time_it(lambda: dst.copy_(src))
    bandwidth = 2 * src.numel() * src.element_size() / t_copy
    small = torch.empty(16)
    launch = _time_it(lambda: torch.add(small, small), repeat=20)
    return _cpu_profile(fp32, bandwidth, launch, _fewbit_slowdown(bandwidth, launch))


#: The CPU's stream-op time over its chunk graphs' roofline (see ``DeviceProfile.stream_factor``):
#: Inductor-compiled chunk graphs, and eager ones (a region with an attention by query chunks against its
#: prefix runs a graph per prefix length, uncompiled). Fitted with :data:`CPU_STREAM_NODE` and
#: :data:`CPU_STREAM_CHUNK_UNIT` on a 2-layer GPT and an HF Llama (128 wide, 2048 vocabulary, 2 x 256
#: tokens, one thread), every region streamed in 2, 4 and 16 chunks with attentions by query chunks or not,
#: each paired with the unstreamed step (12 configurations, 2026-12-03): predicted over measured ratio to the
#: unstreamed step within -10%..+8% (the 2026-12-02 constants, fitted while the CPU's flash attention was
#: priced as nothing, were -24%..+14% off).
CPU_STREAM_FACTOR = (1.8, 1.45)
#: The CPU's fixed cost per node of an eager chunk graph per chunk beyond ``launch_s``, in ``launch_s``.
CPU_STREAM_NODE = 1.5
#: The CPU's fixed cost per chunk of a compiled chunk graph, per input and per non-pointwise kernel, in
#: ``launch_s``: each extra chunk of every region measured about 1.6 ms on the GPT (160 such units a
#: chunk) and 1.8 ms on the Llama (170). Counted per node instead (all nodes), the Llama's streamed steps
#: were predicted 1.2-1.5x what they measured.
CPU_STREAM_CHUNK_UNIT = 2.8


def _cpu_profile(fp32: float, bandwidth: float, launch: float, slowdown: dict) -> DeviceProfile:
    """The CPU profile from its measured rates (one constructor for a fresh and a cached calibration)."""
    return DeviceProfile(
        name="cpu",
        flops={torch.float32: fp32, torch.bfloat16: fp32 / 2, torch.float16: fp32 / 4, torch.float64: fp32 / 2},
        bandwidth=bandwidth,
        launch_s=launch,
        alloc_granularity=1,
        slowdown=slowdown,
        stream_factor=CPU_STREAM_FACTOR,
        stream_node_s=CPU_STREAM_NODE * launch,
        stream_chunk_s=CPU_STREAM_CHUNK_UNIT * launch,
    )


def _fewbit_slowdown(bandwidth: float, launch: float) -> dict:
    """Measured time / roofline time of the few-bit ops' CPU path, on 2M elements (8 MiB in fp32)."""
    from memfit.kernels import fewbit  # noqa: F401  (registers torch.ops.memfit.*)

    x = torch.randn(2 * 2**20)
    g = torch.randn_like(x)
    bounds, levels = [-1.0, 0.0, 1.0], [0.1, 0.4, 0.6, 0.9]
    pack = torch.ops.memfit.fewbit_pack.default
    grad = torch.ops.memfit.fewbit_grad.default
    codes = pack(x, bounds, 2)
    nb = x.numel() * 4
    out = {}
    for name, fn, moved in (
        ("fewbit_pack", lambda: pack(x, bounds, 2), nb + codes.numel() * codes.element_size()),
        ("fewbit_grad", lambda: grad(g, codes, levels, 2), 2 * nb + codes.numel() * codes.element_size()),
    ):
        out[name] = max(1.0, _time_it(fn, repeat=3) / (moved / bandwidth + launch))
    return out


from memfit.config import DEVICE_PROFILES  # noqa: E402  (the names live with the options)


def get_profile(name: str | None, example: torch.device | None = None) -> DeviceProfile:
    """Profile by name; ``None`` picks from the device of the graph (CPU → calibrated, CUDA → h100)."""
    if name is None:
        if example is not None and example.type == "cuda" and torch.cuda.is_available():
            cap = torch.cuda.get_device_capability(example)
            name = "a100" if cap[0] == 8 else "h100"
        else:
            name = "cpu"
    if name == "h100":
        return H100
    if name == "a100":
        return A100
    if name == "cpu":
        return calibrate_cpu()
    raise ValueError(f"unknown device profile {name!r}; accepted: {', '.join(DEVICE_PROFILES)}")


# ---------------------------------------------------------------------------------------------
# Per-node FLOPs and bytes


def tensor_bytes(t) -> int:
    """Bytes of storage a tensor value needs (strides honoured, symbolic sizes hinted)."""
    if not isinstance(t, torch.Tensor):
        return 0
    numel = _hint(t.numel())
    if numel == 0:
        return 0
    try:
        span = 1 + sum((_hint(s) - 1) * abs(_hint(st)) for s, st in zip(t.shape, t.stride()))
    except Exception:  # sparse or otherwise strideless
        span = numel
    return max(span, numel) * t.element_size()


def _hint(x) -> int:
    if isinstance(x, torch.SymInt):
        from memfit.planner.shapes import size_bound

        return size_bound(x)
    return int(x)


def node_vals(node: torch.fx.Node) -> list:
    val = node.meta.get("val")
    flat, _ = tree_flatten(val)
    return [v for v in flat if isinstance(v, torch.Tensor)]


def _arg_val(a):
    return a.meta.get("val") if isinstance(a, torch.fx.Node) else a


def _attention_flops(q, k, v) -> int:
    """Forward FLOPs of one attention: ``q @ k^T`` and ``p @ v``, every key of every query (the CPU's flash
    kernel measured the same time with ``is_causal`` as without: 1.00 against 1.05 ms on [2, 4, 256, 32]).
    Grouped-query attention reads fewer key/value heads, not fewer products: the query's heads count."""
    b, h, sq, d = (_hint(x) for x in q.shape)
    sk, dv = _hint(k.shape[-2]), _hint(v.shape[-1])
    return 2 * b * h * sq * sk * (d + dv)


def _cpu_flash_forward(q, k, v, *args, **kwargs) -> int:
    return _attention_flops(q, k, v)


def _cpu_flash_backward(grad_out, q, k, v, *args, **kwargs) -> int:
    # four products (dV, dP, dQ, dK), twice the forward's: measured 1.9-2.3x the forward's time
    return 2 * _attention_flops(q, k, v)


#: FLOP formulas of attention ops that ``torch.utils.flop_counter`` lacks (by overload packet, called as its
#: registry's are). The CPU's flash attention (what ``scaled_dot_product_attention`` runs on CPU and what a
#: graph traced on CPU fake tensors holds, whatever the device profile) counted one FLOP per output element:
#: a 2-layer GPT's two attentions, 7.2 ms of a 38.5 ms step (torch profiler, a shared machine), were priced
#: as their memory traffic alone, and streamed steps (whose chunk graphs leave the attentions out) were
#: predicted 0.3x of the unstreamed step too fast.
_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
}


def node_flops(node: torch.fx.Node) -> int:
    """FLOPs of one aten node from ``torch.utils.flop_counter``'s formulas (and :data:`_ATTENTION_FLOPS`);
    1 per output element else."""
    if node.op != "call_function":
        return 0
    packet = getattr(node.target, "overloadpacket", None)
    fn = _ATTENTION_FLOPS.get(packet) or flop_registry.get(packet)
    if fn is None and computes_in_place(node):
        fn = flop_registry.get(getattr(torch.ops.aten, packet.__name__.rstrip("_"), None))
    if fn is not None:
        try:
            args = tree_map(_arg_val, node.args)
            kwargs = tree_map(_arg_val, node.kwargs)
            return int(fn(*args, **kwargs, out_val=node.meta.get("val")))
        except Exception:
            pass
    if is_view(node) and not computes_in_place(node):
        return 0
    return sum(_hint(v.numel()) for v in node_vals(node))


def computes_in_place(node: torch.fx.Node) -> bool:
    """An ATen op that computes into one of its inputs (``addmm_``, ``add_``): it aliases its input, so
    the memory model treats it as a view, but it does the work of its out-of-place twin. The stream
    runtime's chunk graphs accumulate weight gradients this way; priced as views, a streamed 2-layer
    GPT's predicted step missed its weight-gradient GEMMs."""
    if node.op != "call_function" or node.target is operator.getitem or getattr(node.target, "_memfit_in_place", False):
        return False
    schema = getattr(node.target, "_schema", None)
    packet = getattr(node.target, "overloadpacket", None)
    return (schema is not None and packet is not None and packet.__name__.endswith("_")
            and any(r.alias_info is not None and r.alias_info.is_write for r in schema.returns))


def is_view(node: torch.fx.Node) -> bool:
    """True when the node's outputs alias an input (views, ``copy_`` into an input, getitem)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem or getattr(node.target, "_memfit_in_place", False):
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return False
    return any(r.alias_info is not None for r in schema.returns)


def is_random(node: torch.fx.Node) -> bool:
    """True for ops that draw random numbers (dropout, rand): they must be saved, never replayed."""
    return torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())


def node_bytes(node: torch.fx.Node) -> int:
    """Bytes a node moves: its tensor inputs read plus its outputs written (views move nothing)."""
    if node.op != "call_function" or (is_view(node) and not computes_in_place(node)):
        return 0
    read = sum(tensor_bytes(a.meta.get("val")) for a in node.all_input_nodes)
    written = sum(tensor_bytes(v) for v in node_vals(node))
    return read + written


def _node_dtype(node: torch.fx.Node) -> torch.dtype:
    for a in node.all_input_nodes:
        v = a.meta.get("val")
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.dtype
    return torch.float32


def resolve_op_models(op_models=None):
    """``op_models``, or when ``None`` the kernels' table (:func:`memfit.kernels.op_models`).

    Looked up at call time, not imported with this module: the kernel modules import the planner (the
    stream runtime reads its plans), so an import here would be a circle, and importing the planner
    should not register memfit's ops or load Triton."""
    if op_models is not None:
        return op_models
    from memfit.kernels import op_models as kernel_op_models

    return kernel_op_models()


def node_time(node: torch.fx.Node, profile: DeviceProfile, op_models=None) -> float:
    """Roofline estimate in seconds: max(compute, memory) plus a launch cost for real kernels.

    ``op_models``: ``{op: OpModel}`` (see :mod:`memfit.kernels`); an op whose model has a ``time`` is
    priced by it (a stream op runs its own chunk graphs). ``None``: the kernels' table."""
    if node.op == "call_function":
        model = resolve_op_models(op_models).get(node.target)
        if model is not None and model.time is not None:
            return model.time(node, profile)
    if node.op != "call_function" or (is_view(node) and not computes_in_place(node)):
        return 0.0
    flops = node_flops(node)
    compute = flops / profile.peak_flops(_node_dtype(node))
    memory = node_bytes(node) / profile.bandwidth
    if profile.slowdown:
        memory *= profile.slowdown.get(getattr(node.target, "_opname", ""), 1.0)
    return max(compute, memory) + profile.launch_s
