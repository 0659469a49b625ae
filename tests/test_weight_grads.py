"""Nobody reads a partial gradient of a split backward.

Default (a plain training loop): W runs in the backward call, so ``.grad`` is complete when
``backward()`` returns and clipping, ``torch.autograd.grad`` and gradient hooks see eager's values.
Deferred (``memfit.defer_weight_grads()``, what a pipeline stage does): every guarded read refuses
with ``PendingWeightGradsError`` naming the fix, ``torch.autograd.grad`` still returns the gradients,
and once W has run the result equals eager's. Both inner compilers; eager PyTorch is the reference.
(The pipeline schedule that defers W on purpose is tests/test_pipeline.py.)
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import memfit
from memfit import runtime

INNERS = ["eager", "inductor"]


@pytest.fixture(autouse=True)
def _empty_queue():
    runtime.discard_weight_grads()
    yield
    runtime.discard_weight_grads()


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 8))
    x = torch.randn(32, 16)
    return model, x


def _loss(model, x):
    return model(x).pow(2).mean()


def _split(inner):
    """(model, compiled, x, backend) of the split MLP, compiled once per inner compiler per test."""
    model, x = _mlp()
    backend = memfit.backend(passes=["split_backward"], inner=inner)
    return model, torch.compile(model, backend=backend), x, backend


def _eager_grads(model, x, *, clip=None, hook=None):
    ref = copy.deepcopy(model)
    if hook is not None:
        for p in ref.parameters():
            p.register_hook(hook)
    _loss(ref, x).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
    return [p.grad.clone() for p in ref.parameters()]


def _close(got, want, inner):
    tol = dict(rtol=1.3e-6, atol=1e-6) if inner == "eager" else dict(rtol=2e-5, atol=1e-5)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("inner", INNERS)
def test_default_grads_are_complete_when_backward_returns(inner):
    model, compiled, x, backend = _split(inner)
    want_clipped = _eager_grads(model, x, clip=0.05)
    want = _eager_grads(model, x)
    _loss(compiled, x).backward()
    assert backend.records[-1].split is not None  # the backward was split into B and W
    assert not runtime.pending_weight_grads()
    _close([p.grad for p in model.parameters()], want, inner)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    assert norm > 0.05  # the clip did something, on every gradient
    _close([p.grad for p in model.parameters()], want_clipped, inner)
    # torch.autograd.grad on the parameters: eager's gradients, nothing queued, .grad untouched
    before = [p.grad.clone() for p in model.parameters()]
    got = torch.autograd.grad(_loss(compiled, x), list(model.parameters()), allow_unused=True)
    _close(list(got), want, inner)
    _close([p.grad for p in model.parameters()], before, inner)
    assert not runtime.pending_weight_grads()


@pytest.mark.parametrize("inner", INNERS)
def test_default_gradient_hooks_see_eager_gradients(inner):
    model, compiled, x, _ = _split(inner)
    want = _eager_grads(model, x, hook=lambda g: 2 * g)
    seen = []
    for p in model.parameters():
        p.register_hook(lambda g: 2 * g)
        p.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    _loss(compiled, x).backward()
    _close([p.grad for p in model.parameters()], want, inner)
    assert len(seen) == len(want)  # once per parameter, with the accumulated gradient
    assert sorted(t.shape for t in seen) == sorted(t.shape for t in want)


@pytest.mark.parametrize("inner", INNERS)
def test_deferred_w_refuses_every_guarded_read_then_matches_eager(inner):
    model, compiled, x, _ = _split(inner)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    want_clipped = _eager_grads(model, x, clip=0.05)
    with memfit.defer_weight_grads():
        _loss(compiled, x).backward()
        assert runtime.deferring()
    assert all(p.grad is None for p in model.parameters()) and runtime.pending_weight_grads()
    for read in (
        lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05),
        lambda: torch.nn.utils.clip_grad_value_(model.parameters(), 0.01),
        lambda: model.zero_grad(),
        lambda: compiled.zero_grad(set_to_none=True),
        lambda: opt.zero_grad(),
        lambda: opt.step(),
    ):
        with pytest.raises(memfit.PendingWeightGradsError, match=r"run_weight_grads\(\)"):
            read()
    other = nn.Linear(2, 2)
    torch.nn.utils.clip_grad_norm_(other.parameters(), 1.0)  # parameters with nothing queued: untouched
    other.zero_grad()
    assert runtime.run_weight_grads() == 1
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    _close([p.grad for p in model.parameters()], want_clipped, inner)

    # a tensor hook registered between B and W sees W's gradient when it lands, as autograd's would
    model.zero_grad(set_to_none=True)
    with memfit.defer_weight_grads():
        _loss(compiled, x).backward()
    handles = [p.register_hook(lambda g: 3 * g) for p in model.parameters()]
    runtime.run_weight_grads()
    _close([p.grad for p in model.parameters()], _eager_grads(model, x, hook=lambda g: 3 * g), inner)
    for h in handles:
        h.remove()


@pytest.mark.parametrize("inner", INNERS)
def test_deferred_autograd_grad_and_hooks(inner):
    """Inside the deferring context, torch.autograd.grad still returns every gradient (its W runs in the
    call); a parameter with gradient hooks gets its W in the backward call (autograd calls those hooks
    there), so every hook sees eager's gradient."""
    model, compiled, x, _ = _split(inner)
    want = _eager_grads(model, x)
    with memfit.defer_weight_grads():
        got = torch.autograd.grad(_loss(compiled, x), list(model.parameters()))
    _close(list(got), want, inner)
    assert not runtime.pending_weight_grads() and all(p.grad is None for p in model.parameters())

    # gradient hooks: autograd calls them in the backward itself (with None, were W queued), so a graph
    # whose parameters have hooks gets its W in the backward call
    want_hooked = _eager_grads(model, x, hook=lambda g: 3 * g)
    seen = []
    for p in model.parameters():
        p.register_hook(lambda g: 3 * g)
        p.register_post_accumulate_grad_hook(lambda p: seen.append((p, p.grad.clone())))
    with memfit.defer_weight_grads():
        _loss(compiled, x).backward()
    assert not runtime.pending_weight_grads()
    _close([p.grad for p in model.parameters()], want_hooked, inner)
    assert sorted(id(p) for p, _ in seen) == sorted(id(p) for p in model.parameters())  # once each
    _close([g for _, g in sorted(seen, key=lambda t: [id(p) for p in model.parameters()].index(id(t[0])))],
           want_hooked, inner)
