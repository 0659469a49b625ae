"""Triton kernels vs their torch references, bit for bit, run by ``test_fewbit.py`` in a process
started with ``TRITON_INTERPRET=1`` (so the kernels run on CPU tensors in Triton's interpreter)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from memfit.kernels import fewbit as K
from memfit.kernels import fewbit_tables as T

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip("run with TRITON_INTERPRET=1 (test_fewbit.py does)", allow_module_level=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_triton_kernels_match_reference_bit_for_bit(dtype, bits):
    table = T.table("gelu", bits)
    gen = torch.Generator().manual_seed(bits)
    for shape in [(1,), (7,), (3, 5, 7), (1031,), (2, 1029)]:
        x = (torch.randn(shape, generator=gen) * 2).to(dtype)
        x.view(-1)[0] = table.boundaries[0]  # exactly on a boundary: the lower interval
        g = torch.randn(shape, generator=gen).to(dtype)
        codes = K.pack_reference(x, table.boundaries, bits)
        assert codes.dtype == torch.uint8 and codes.numel() == math.ceil(x.numel() / 8) * bits
        assert torch.equal(K.pack_triton(x, table.boundaries, bits), codes)
        ref = K.grad_reference(g, codes, table.levels, bits)
        assert torch.equal(K.grad_triton(g, codes, table.levels, bits), ref)
        # and the reference is what it claims: grad * level[code]
        expected = torch.tensor(table.approx(x.float().numpy()), dtype=torch.float32) * g.float()
        assert torch.equal(ref, expected.to(dtype))


def test_kernels_take_non_contiguous_inputs():
    t = T.table("silu", 2)
    x = torch.randn(9, 13).t()
    assert torch.equal(K.pack_triton(x, t.boundaries, 2), K.pack_reference(x.contiguous(), t.boundaries, 2))
