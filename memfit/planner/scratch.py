"""Memory that ATen's CPU convolutions, batch norm and half-precision matmuls and reductions allocate
and free inside themselves, measured per shape.

The memory model counts an op's outputs. A CPU convolution also copies its operands into the
blocked layout oneDNN computes in, and frees the copies before it returns: on a ``[8, 16, 32, 32]``
input with a 3x3 kernel the backward's peak is its outputs plus 1 MiB (the input and the output
gradient, 512 KiB each), the forward's its output plus the input and the weight; a 1x1 kernel copies
nothing, and a 3-channel stem or a stride-2 kernel copies amounts no simple formula gave. Without
these bytes a small ResNet (conv, BatchNorm, residual; 8 x 3 x 32 x 32) was predicted at 5.48 MiB
and measured 6.26 under ``inner="eager"`` (with them: 6.26, to 4 bytes), and a plan for 0.6x of its
peak measured 1.11x the budget.

Batch norm's training backward allocates one more tensor of its input's size (512 KiB on the input
above), and a bf16 (or fp16) matmul or reduction works in packed or fp32 copies (a [64, 32] x [32, 64]
product: 9 KiB besides its 8 KiB output; fp32 ones allocate nothing): a bf16 mixture-of-experts step
was predicted 6% under its measured peak, and a plan for half of it measured 1.09x the budget.

Dropout's backward (``grad * mask * scale``) computes ``grad * mask`` into a temporary of the
gradient's size before it scales it into its output: a checkpointed HF GPT-2's attention dropout
([2, 4, 256, 256] float) holds 2 MiB besides its output there, which a streamed plan's peak reached
(11.19 MiB measured against 9.38 predicted under ``inner="eager"``).

The CPU's flash attention (what ``scaled_dot_product_attention`` runs on CPU) works in per-thread
buffers it allocates itself: its backward on [2, 4, 256, 32] (one thread) holds 128 KiB of them while
its three gradients are live. Without them an HF GPT-2 planned for 10.97 MiB replayed at 10.84 and
measured 10.97 MiB and 260 bytes: over the budget by exactly that workspace.

So the scratch of each such op the model meets is measured: the op run once on real tensors of the
node's shapes and strides (zeros, under no grad, outside any fake mode), the allocator's peak during
it from the profiler, minus its outputs; kept per shape for the process. Where it cannot be measured
(operands over ``MEASURE_LIMIT`` bytes, a profiler already running, symbolic sizes) the operands are
counted instead. Only on the CPU: a GPU's cuDNN and cuBLAS workspaces are not modelled here.

Under Inductor these ops are extern kernels whose operands Inductor lays out itself (convolutions
channels-last, where oneDNN copies far less), so the FX-level model leaves them out
(``OpModel.inside_plans=False``) and the replay of the compiled buffer plan adds each kernel's scratch,
measured with the strides Inductor chose (``memfit.planner.inductor_plan``): the same ResNet, 6.09 MiB
measured, replayed to 4 bytes.
"""

from __future__ import annotations

import functools

import torch
import torch.fx

from memfit.kernels import OpModel

aten = torch.ops.aten

#: Largest operand bytes an op is run at to measure its scratch (a plan of a big model on
#: fake tensors must not allocate it for real).
MEASURE_LIMIT = 64 * 2**20


def _tensor_args(node: torch.fx.Node) -> list:
    """The node's arguments, each Node replaced by its value (a fake tensor), the rest as they are."""
    return [a.meta.get("val") if isinstance(a, torch.fx.Node) else a for a in node.args]


def _tensor_kwargs(node: torch.fx.Node) -> dict:
    return {k: a.meta.get("val") if isinstance(a, torch.fx.Node) else a for k, a in node.kwargs.items()}


def _operand_bytes(node: torch.fx.Node) -> int:
    """The fallback: the operands the op copies (convolution forward: input and weight; backward: the
    output gradient and the input; batch norm's backward: one tensor of the input's size)."""
    vals = [v for v in _tensor_args(node) if isinstance(v, torch.Tensor)]
    if node.target is aten.native_batch_norm_backward.default:
        vals = vals[1:2]
    if node.target is aten.native_dropout_backward.default:
        vals = vals[:1]  # one temporary of the gradient's size
    if node.target in _MATMULS:
        return sum(v.numel() * v.element_size() for v in vals)  # the operands, packed
    if node.target in _REDUCTIONS:
        return vals[0].numel() * 4 if vals else 0  # an fp32 copy of the input
    return sum(v.numel() * v.element_size() for v in vals[:2])


_MATMULS = (aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default)
#: Reductions that accumulate a half-precision input in an fp32 copy of it on CPU (a bf16 mean over
#: [4, 32, 16, 16]: 128 KiB besides its output); in fp32 they allocate nothing.
_REDUCTIONS = (aten.mean.dim, aten.mean.default, aten.sum.dim_IntList, aten.sum.default)
_FP32_FREE = _MATMULS + _REDUCTIONS
#: The CPU's flash attention, forward and backward: per-thread buffers (so the thread count is part of
#: the measurement's key). Where it cannot be measured nothing is counted (its operands are no estimate).
_ATTENTION = (aten._scaled_dot_product_flash_attention_for_cpu.default,
              aten._scaled_dot_product_flash_attention_for_cpu_backward.default)


def _scratch(node: torch.fx.Node, strides: list | None = None) -> int:
    """``strides``: the tensor arguments' strides as compiled, in order (Inductor lays convolution
    operands out channels-last, and oneDNN then copies less than for the FX values' strides)."""
    vals = _tensor_args(node)
    if strides is not None:
        it = iter(strides)
        vals = [_restrided(v, next(it, None)) if isinstance(v, torch.Tensor) else v for v in vals]
    attention = node.target in _ATTENTION
    kwargs = _tensor_kwargs(node) if attention else {}
    tensors = [v for v in [*vals, *kwargs.values()] if isinstance(v, (torch.Tensor, _Layout))]

    def fallback() -> int:  # the attention's operands are no estimate of its buffers: nothing is counted
        return 0 if attention else _operand_bytes(node)
    if not tensors or any(t.device.type != "cpu" for t in tensors):
        return 0  # cuDNN's workspace is another story; the planner's CPU tests are what this serves
    if node.target in _FP32_FREE and all(t.dtype in (torch.float32, torch.float64) for t in tensors):
        return 0  # fp32 matmuls and reductions write their output in place (measured: 0 bytes besides it)
    if any(not isinstance(s, int) for t in tensors for s in t.shape):
        return fallback()
    if sum(t.numel() * t.element_size() for t in tensors) > MEASURE_LIMIT:
        return fallback()

    def one(v):
        if isinstance(v, (torch.Tensor, _Layout)):
            return ("t", tuple(v.shape), tuple(v.stride()), v.dtype)
        return ("a", _hashable(v))

    key = tuple(one(v) for v in vals)
    kw = tuple((k, one(v)) for k, v in sorted(kwargs.items()))
    # the attention's buffers are per thread: the thread count keys its measurement
    threads = torch.get_num_threads() if attention else None
    try:
        return _measured(node.target, key, kw, threads)
    except Exception:  # noqa: BLE001 - a profiler already running, an odd argument: count the operands
        return fallback()


class _Layout:
    """A tensor's shape, strides and dtype (enough for :func:`_scratch`), with other strides."""

    def __init__(self, t: torch.Tensor, stride):
        self.shape, self.dtype, self.device = t.shape, t.dtype, t.device
        self._stride = tuple(stride)
        self._numel, self._size = t.numel(), t.element_size()

    def stride(self):
        return self._stride

    def numel(self):
        return self._numel

    def element_size(self):
        return self._size


def _restrided(t: torch.Tensor, stride):
    if stride is None or len(stride) != t.dim():
        return t
    return _Layout(t, stride)


def _hashable(v):
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    return v


@functools.lru_cache(maxsize=1024)
def _measured(op, key, kw=(), threads=None) -> int:
    """``threads``: part of the cache key only (the op runs with the process's thread count)."""
    from torch.utils._python_dispatch import _disable_current_modes

    from memfit.measurement import _cpu_window

    def real(k):
        return torch.empty_strided(k[1], k[2], dtype=k[3]).zero_() if k[0] == "t" else _unhashable(k[1])

    with _disable_current_modes(), torch.no_grad():
        args = [real(k) for k in key]
        kwargs = {name: real(k) for name, k in kw}
        outs: list = []

        def run():
            outs.append(op(*args, **kwargs))

        peak, _ = _cpu_window(run)
        flat = [t for t in torch.utils._pytree.tree_flatten(outs)[0] if isinstance(t, torch.Tensor)]
        out_bytes = sum(t.untyped_storage().nbytes() for t in flat)
    return max(0, peak - out_bytes)


def _unhashable(v):
    if isinstance(v, tuple):
        return [_unhashable(x) for x in v]
    return v


#: The planner's models of these ATen ops (merged by :func:`memfit.kernels.op_models`).
OP_MODELS = {
    aten.convolution.default: OpModel(scratch=_scratch, inside_plans=False),
    aten.convolution_backward.default: OpModel(scratch=_scratch, inside_plans=False),
    aten.native_batch_norm_backward.default: OpModel(scratch=_scratch, inside_plans=False),
    aten.native_dropout_backward.default: OpModel(scratch=_scratch, inside_plans=False),
    **{op: OpModel(scratch=_scratch, inside_plans=False) for op in _FP32_FREE + _ATTENTION},
}
