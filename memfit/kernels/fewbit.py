"""Few-bit activation-gradient kernels: pack codes in the forward, apply levels in the backward.

Two ops, each a Triton kernel beside a pure-torch reference that defines its result bit for bit:

* ``memfit::fewbit_pack(x, boundaries, bits) -> uint8[ceil(n / 8) * bits]``: the code of each
  element, ``#{i : float32(x) > boundaries[i]}``, packed ``bits`` bits per element. Codes go in
  groups of 8 elements to ``bits`` bytes (a 32-bit little-endian word per group, element ``i`` of
  the group at bit ``bits * i``): 1 bit is 8 codes per byte, 2 bits 4 per byte, 4 bits 2 per byte,
  and 3 bits 8 codes per 3 bytes (no nibble padding: 3-bit codes are 10.7x smaller than fp32,
  not 8x).
* ``memfit::fewbit_grad(grad, codes, levels, bits) -> grad * levels[code]``, computed in float32
  and rounded once to ``grad``'s dtype (as ``aten.gelu_backward`` does for bf16 and fp16).

The forward value ``f(x)`` is not produced here: the graph keeps the model's own ``aten`` op, so
the forward is bit-identical to eager and Inductor still fuses ``f`` into its producer. Packing
reads ``x`` once more; that is one extra read of a tensor the forward has just written.

The ops are registered with fake implementations, so they trace, compile (Inductor calls them as
extern kernels) and appear in the graphs the memory model sees. On CUDA tensors the Triton kernels
run; elsewhere the reference does. Tests run the kernels under ``TRITON_INTERPRET=1`` on CPU
tensors and compare them with the reference bit for bit; kernels are built on first use so the
interpreter setting in force then is the one used (:func:`triton_kernels`).
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import triton
import triton.language as tl

GROUP = 8  # codes per packed group: a group of b-bit codes fills exactly b bytes
BLOCK_GROUPS = 128  # groups per Triton program (1024 elements)


def packed_numel(numel: int, bits: int) -> int:
    """Bytes that :func:`pack_reference` writes for ``numel`` elements: ``ceil(numel / 8) * bits``."""
    return -(-numel // GROUP) * bits


def _check_bits(bits: int, n_table: int, what: str) -> None:
    if bits not in (1, 2, 3, 4):
        raise ValueError(f"few-bit codes are 1 to 4 bits wide, got bits={bits}")
    want = 2**bits - 1 if what == "boundaries" else 2**bits
    if n_table != want:
        raise ValueError(f"{bits}-bit codes need {want} {what}, got {n_table}")


# -- pure-torch reference (defines the results) ---------------------------------------------------
#: Elements the reference handles at a time (a multiple of 8). Its temporaries are about 3 bytes per
#: element of a chunk (24 KiB); at 64Ki elements they still put a 2-layer GPT's measured peak 160 KiB
#: above the model's, and done at once on a [4, 256, 1024] fp32 activation
#: (int32 codes and words for the whole tensor) they made the measured forward peak of a 4-layer GPT
#: 11 MiB higher than the memory model's, which, like the Triton kernel, has no workspace.
REFERENCE_CHUNK = 1 << 13
#: ... but at most this many chunks per tensor: the Python loop costs ~75 small ops per chunk (at 8Ki
#: elements a 4-layer GPT's step ran 2.2x slower); with 16 the workspace stays under 0.2 bytes per
#: element (5% of an fp32 activation) and the loop under 1,200 ops.
REFERENCE_MAX_CHUNKS = 16


def _chunk(n: int) -> int:
    return max(REFERENCE_CHUNK, -(-n // (REFERENCE_MAX_CHUNKS * GROUP)) * GROUP)


def pack_reference(x: torch.Tensor, boundaries: Sequence[float], bits: int) -> torch.Tensor:
    _check_bits(bits, len(boundaries), "boundaries")
    flat = x.reshape(-1)
    n = flat.numel()
    out = torch.empty(packed_numel(n, bits), dtype=torch.uint8, device=x.device)
    chunk = _chunk(n)
    for start in range(0, n, chunk):
        part = flat[start : start + chunk].float()
        m = part.numel()
        codes = torch.zeros(-(-m // GROUP) * GROUP, dtype=torch.uint8, device=x.device)
        for s in boundaries:  # NaN compares false everywhere: code 0, as in the kernel
            codes[:m] += part > s
        codes = codes.view(-1, GROUP)
        word = torch.zeros(codes.shape[0], dtype=torch.int32, device=x.device)
        for i in range(GROUP):  # element i of a group at bit bits*i (disjoint fields)
            word |= codes[:, i].to(torch.int32) << (bits * i)
        g0 = start // GROUP
        dst = out[g0 * bits : (g0 + word.numel()) * bits].view(-1, bits)
        for j in range(bits):
            dst[:, j] = (word >> (8 * j)) & 0xFF
    return out


def grad_reference(grad: torch.Tensor, codes: torch.Tensor, levels: Sequence[float], bits: int) -> torch.Tensor:
    _check_bits(bits, len(levels), "levels")
    n = grad.numel()
    if codes.numel() != packed_numel(n, bits):
        raise ValueError(f"{codes.numel()} code bytes do not match {n} gradient elements at {bits} bits")
    flat = grad.reshape(-1)
    out = torch.empty(n, dtype=grad.dtype, device=grad.device)
    table = torch.tensor(list(levels), dtype=torch.float32, device=grad.device)
    chunk = _chunk(n)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        g0, g1 = start // GROUP, -(-stop // GROUP)
        src = codes[g0 * bits : g1 * bits].view(-1, bits)
        word = torch.zeros(g1 - g0, dtype=torch.int32, device=grad.device)
        for j in range(bits):
            word |= src[:, j].to(torch.int32) << (8 * j)
        for i in range(GROUP):
            idx = slice(start + i, stop, GROUP)
            count = len(range(start + i, stop, GROUP))
            if count:
                level = table[((word[:count] >> (bits * i)) & (2**bits - 1)).long()]
                out[idx] = flat[idx].float() * level
    return out.view(grad.shape)


# -- Triton kernels ---------------------------------------------------------------------------------
def _pack_kernel(x_ptr, bounds_ptr, out_ptr, n, BITS: tl.constexpr, NB: tl.constexpr, BG: tl.constexpr):
    pid = tl.program_id(0)
    g = pid * BG + tl.arange(0, BG)  # group indices [BG]
    e = tl.arange(0, 8)  # element within group [8]
    idx = g[:, None] * 8 + e[None, :]
    x = tl.load(x_ptr + idx, mask=idx < n, other=0.0).to(tl.float32)
    code = tl.zeros([BG, 8], dtype=tl.int32)
    for i in tl.static_range(NB):
        s = tl.load(bounds_ptr + i)
        code += (x > s).to(tl.int32)
    code = tl.where(idx < n, code, 0)
    word = tl.sum(code << (e[None, :] * BITS), axis=1)  # [BG]
    n_groups = (n + 7) // 8
    for j in tl.static_range(BITS):
        byte = ((word >> (8 * j)) & 0xFF).to(tl.uint8)
        tl.store(out_ptr + g * BITS + j, byte, mask=g < n_groups)


def _grad_kernel(g_ptr, codes_ptr, levels_ptr, out_ptr, n, BITS: tl.constexpr, BG: tl.constexpr, OUT_BF16: tl.constexpr):
    pid = tl.program_id(0)
    g = pid * BG + tl.arange(0, BG)
    e = tl.arange(0, 8)
    n_groups = (n + 7) // 8
    word = tl.zeros([BG], dtype=tl.int32)
    for j in tl.static_range(BITS):
        byte = tl.load(codes_ptr + g * BITS + j, mask=g < n_groups, other=0).to(tl.int32)
        word = word | (byte << (8 * j))
    code = (word[:, None] >> (e[None, :] * BITS)) & ((1 << BITS) - 1)
    level = tl.load(levels_ptr + code)
    idx = g[:, None] * 8 + e[None, :]
    grad = tl.load(g_ptr + idx, mask=idx < n, other=0.0)
    out = grad.to(tl.float32) * level
    if OUT_BF16:
        # Round to nearest even by hand: Triton's interpreter truncates float32 -> bfloat16, which
        # would make the interpreted kernel differ from the reference (and from the GPU) in the last bit.
        u = out.to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        rounded = (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(out_ptr + idx, tl.where(out != out, out.to(tl.bfloat16), rounded), mask=idx < n)
    else:
        tl.store(out_ptr + idx, out.to(out_ptr.dtype.element_ty), mask=idx < n)


@functools.lru_cache(maxsize=None)
def _jit(interpret: bool):
    return triton.jit(_pack_kernel), triton.jit(_grad_kernel)


def triton_kernels():
    """The jitted kernels, built for the interpreter when ``TRITON_INTERPRET=1`` is set now."""
    from triton import knobs

    return _jit(bool(knobs.runtime.interpret))


def _table_tensor(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float32, device=device)


def pack_triton(x: torch.Tensor, boundaries: Sequence[float], bits: int) -> torch.Tensor:
    _check_bits(bits, len(boundaries), "boundaries")
    x = x.contiguous()
    n = x.numel()
    out = torch.empty(packed_numel(n, bits), dtype=torch.uint8, device=x.device)
    if n:
        groups = -(-n // GROUP)
        grid = (-(-groups // BLOCK_GROUPS),)
        triton_kernels()[0][grid](x, _table_tensor(boundaries, x.device), out, n, BITS=bits, NB=len(boundaries), BG=BLOCK_GROUPS)
    return out


def grad_triton(grad: torch.Tensor, codes: torch.Tensor, levels: Sequence[float], bits: int) -> torch.Tensor:
    _check_bits(bits, len(levels), "levels")
    grad = grad.contiguous()
    n = grad.numel()
    if codes.numel() != packed_numel(n, bits):
        raise ValueError(f"{codes.numel()} code bytes do not match {n} gradient elements at {bits} bits")
    out = torch.empty_like(grad)
    if n:
        groups = -(-n // GROUP)
        grid = (-(-groups // BLOCK_GROUPS),)
        triton_kernels()[1][grid](grad, codes, _table_tensor(levels, grad.device), out, n, BITS=bits, BG=BLOCK_GROUPS, OUT_BF16=grad.dtype == torch.bfloat16
        )
    return out


def _use_triton(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


# -- custom ops (what the graphs call) -----------------------------------------------------------------
@torch.library.custom_op("memfit::fewbit_pack", mutates_args=())
def fewbit_pack(x: torch.Tensor, boundaries: Sequence[float], bits: int) -> torch.Tensor:
    """Pack the ``bits``-bit code of every element of ``x`` (see the module docstring)."""
    if _use_triton(x):
        return pack_triton(x, boundaries, bits)
    return pack_reference(x, boundaries, bits)


@fewbit_pack.register_fake
def _(x, boundaries, bits):
    return x.new_empty(packed_numel(x.numel(), bits), dtype=torch.uint8)


@torch.library.custom_op("memfit::fewbit_grad", mutates_args=())
def fewbit_grad(grad: torch.Tensor, codes: torch.Tensor, levels: Sequence[float], bits: int) -> torch.Tensor:
    """``grad * levels[code]`` in float32, rounded to ``grad``'s dtype; contiguous, ``grad``'s shape."""
    if _use_triton(grad):
        return grad_triton(grad, codes, levels, bits)
    return grad_reference(grad, codes, levels, bits)


@fewbit_grad.register_fake
def _(grad, codes, levels, bits):
    return torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
