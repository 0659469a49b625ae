"""Shared test helpers: build the three reference models and compare a compiled step with eager."""

from __future__ import annotations

import copy

import torch

from memfit.measurement import to_loss


def build(name: str):
    """(model, args, kwargs) of a small reference model: 'mlp', 'gpt' or 'llama'."""
    import gpt
    import hf_llama
    import mlp

    factory = {"mlp": mlp.small, "gpt": gpt.small, "llama": hf_llama.small}[name]
    model, inputs = factory()[:2]
    if isinstance(inputs, dict):
        return model, (), inputs
    return model, tuple(inputs), {}


def loss_and_grads(model, args, kwargs):
    model.zero_grad(set_to_none=True)
    loss = to_loss(model(*args, **kwargs))
    loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_matches_eager(name: str, backend, *, rtol=1.3e-6, atol=1e-5, steps: int = 2):
    """Forward loss and every parameter gradient of the compiled model equal eager's."""
    model, args, kwargs = build(name)
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend)
    for _ in range(steps):  # the second step runs the cached graphs
        loss_ref, grads_ref = loss_and_grads(ref, args, kwargs)
        loss, grads = loss_and_grads(compiled, args, kwargs)
        torch.testing.assert_close(loss, loss_ref, rtol=rtol, atol=atol)
        assert grads.keys() == grads_ref.keys() and grads
        for k in grads_ref:
            torch.testing.assert_close(grads[k], grads_ref[k], rtol=rtol, atol=atol, msg=lambda m: f"grad of {k}: {m}")


class FewbitReference(torch.autograd.Function):
    """The hand-written meaning of a few-bit rewrite: the activation's own forward, and
    ``grad * level[code(x)]`` in the backward (``table`` from ``memfit.kernels.fewbit_tables``)."""

    @staticmethod
    def forward(ctx, x, fn, table):
        ctx.save_for_backward(x)
        ctx.table = table
        return fn(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        level = torch.tensor(ctx.table.approx(x.detach().float().numpy()), dtype=torch.float32)
        return (g.float() * level).to(g.dtype), None, None
