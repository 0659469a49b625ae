"""memfit's contract, checked on drawn models (issue 23): for a budget, compiling either raises
``BudgetError``, or the step runs with eager's gradients and a measured peak within the budget (+2%),
or memfit warns that it cannot keep the budget (code outside its graphs, a backward that retains its
graph, a graph run again before its backward). Anything else is a violation.

The models go beyond ``test_properties.py``'s: conv/BatchNorm stacks, a recurrent cell written in torch
ops (unrolled by Dynamo), a top-2 router over experts (dense dispatch), residual MLP mixes; bf16
parameters; a block under a user ``torch.utils.checkpoint`` region; and steps with two losses, a
``retain_graph=True`` double backward, or the model called twice. Budgets: 0.3x to 1.2x of the peak of
the same step compiled by memfit with no budget.

Used by ``tests/test_contract.py`` (a few fixed draws) and ``benchmarks/contract.py`` (many, with the
outcome counts).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import torch
import torch._functorch.config
import torch.nn as nn
from hypothesis import strategies as st
from torch.utils.checkpoint import checkpoint

import memfit
from memfit.measurement import measure

#: Gradients are compared against their scale (the largest |g| of all parameters), not each tensor's
#: own: a bias feeding a BatchNorm has a true gradient of rounding noise (|g| ~ 1e-7), which any
#: reordering changes completely (issue 23's ResNet stem bias).
RTOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
SLACK = 1.02  # measured peak may exceed the budget by 2% (allocator rounding)


@dataclasses.dataclass(frozen=True)
class Spec:
    family: str  # "conv" | "rnn" | "router" | "mix"
    depth: int
    width: int
    bf16: bool
    user_checkpoint: bool
    step: str  # "plain" | "two_losses" | "retain_graph" | "called_twice"
    frac: float


class ConvNet(nn.Module):
    def __init__(self, s: Spec):
        super().__init__()
        c = s.width
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()) for _ in range(s.depth)
        )
        self.head = nn.Linear(c, 10)
        self.heads2 = nn.Linear(c, 1)
        self.ck = s.user_checkpoint

    def body(self, x):
        h = self.stem(x)
        for i, b in enumerate(self.blocks):
            h = h + (checkpoint(b, h, use_reentrant=False) if self.ck and i == 0 else b(h))
        return h.mean((2, 3))

    def inputs(self, dtype):
        return (torch.randn(4, 3, 16, 16, dtype=dtype),)


class RecurrentNet(nn.Module):
    """A GRU-like cell in torch ops over 6 steps (Dynamo unrolls the loop)."""

    def __init__(self, s: Spec):
        super().__init__()
        d = s.width
        self.inp = nn.Linear(8, d)
        self.cells = nn.ModuleList(nn.Linear(2 * d, 3 * d) for _ in range(s.depth))
        self.head = nn.Linear(d, 10)
        self.heads2 = nn.Linear(d, 1)
        self.ck = s.user_checkpoint

    def _cell(self, cell, x, h):
        z, r, n = cell(torch.cat([x, h], -1)).chunk(3, -1)
        z, r = torch.sigmoid(z), torch.sigmoid(r)
        return (1 - z) * h + z * torch.tanh(n * r)

    def body(self, x):
        xs = self.inp(x)
        for i, cell in enumerate(self.cells):
            h = torch.zeros_like(xs[:, 0])
            outs = []
            for t in range(xs.shape[1]):
                h = checkpoint(self._cell, cell, xs[:, t], h, use_reentrant=False) if self.ck and i == 0 else self._cell(cell, xs[:, t], h)
                outs.append(h)
            xs = torch.stack(outs, 1)
        return xs.mean(1)

    def inputs(self, dtype):
        return (torch.randn(16, 6, 8, dtype=dtype),)


class RouterNet(nn.Module):
    """Top-2 routing over 4 experts with dense dispatch (every expert runs, weighted by its gate)."""

    def __init__(self, s: Spec):
        super().__init__()
        d = s.width
        self.inp = nn.Linear(8, d)
        self.gates = nn.ModuleList(nn.Linear(d, 4) for _ in range(s.depth))
        self.experts = nn.ModuleList(
            nn.ModuleList(nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)) for _ in range(4))
            for _ in range(s.depth)
        )
        self.head = nn.Linear(d, 10)
        self.heads2 = nn.Linear(d, 1)
        self.ck = s.user_checkpoint

    def _layer(self, i, x):
        p = self.gates[i](x).softmax(-1)
        w, idx = p.topk(2, -1)
        out = x
        for k, ex in enumerate(self.experts[i]):
            out = out + ex(x) * ((idx == k).to(x.dtype) * w).sum(-1, keepdim=True)
        return out

    def body(self, x):
        h = self.inp(x)
        for i in range(len(self.gates)):
            h = checkpoint(self._layer, i, h, use_reentrant=False) if self.ck and i == 0 else self._layer(i, h)
        return h

    def inputs(self, dtype):
        return (torch.randn(64, 8, dtype=dtype),)


class MixNet(nn.Module):
    """Residual MLP blocks with LayerNorm, and a skip from the input to the last block."""

    def __init__(self, s: Spec):
        super().__init__()
        d = s.width
        self.inp = nn.Linear(8, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d)) for _ in range(s.depth)
        )
        self.head = nn.Linear(d, 10)
        self.heads2 = nn.Linear(d, 1)
        self.ck = s.user_checkpoint

    def body(self, x):
        h0 = h = self.inp(x)
        for i, b in enumerate(self.blocks):
            h = h + (checkpoint(b, h, use_reentrant=False) if self.ck and i == 0 else b(h))
        return h + h0

    def inputs(self, dtype):
        return (torch.randn(64, 8, dtype=dtype),)


FAMILIES = {"conv": ConvNet, "rnn": RecurrentNet, "router": RouterNet, "mix": MixNet}


class Wrapped(nn.Module):
    """The drawn net, returning one loss or two (the step adds them)."""

    def __init__(self, net: nn.Module, two_losses: bool):
        super().__init__()
        self.net = net
        self.two = two_losses

    def forward(self, x, y):
        h = self.net.body(x)
        loss = nn.functional.cross_entropy(self.net.head(h).float(), y)
        if self.two:
            return loss, self.net.heads2(h).float().pow(2).mean()
        return loss


@st.composite
def specs(draw) -> Spec:
    family = draw(st.sampled_from(sorted(FAMILIES)))
    return Spec(
        family=family,
        depth=draw(st.integers(1, 3)),
        width=draw(st.sampled_from([16, 32, 48])),
        bf16=draw(st.booleans()),
        user_checkpoint=draw(st.booleans()),
        step=draw(st.sampled_from(["plain", "two_losses", "retain_graph", "called_twice"])),
        frac=draw(st.sampled_from([0.3, 0.5, 0.7, 0.85, 1.0, 1.2])),
    )


def build(spec: Spec, seed: int = 0):
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if spec.bf16 else torch.float32
    net = FAMILIES[spec.family](spec)
    model = Wrapped(net, spec.step == "two_losses").to(dtype)
    x = net.inputs(dtype)
    n = x[0].shape[0]
    y = torch.randint(0, 10, (n,))
    args = (*x, y)
    args2 = (x[0].flip(0), y.flip(0))
    return model, args, args2


def run_step(model, spec: Spec, args, args2):
    """One training step as the spec says; returns the summed loss (detached)."""
    if spec.step == "called_twice":
        loss = model(*args) + model(*args2)
        loss.backward()
    elif spec.step == "two_losses":
        a, b = model(*args)
        loss = a + b
        loss.backward()
    elif spec.step == "retain_graph":
        loss = model(*args)
        loss.backward(retain_graph=True)
        loss.backward()
    else:
        loss = model(*args)
        loss.backward()
    return loss.detach().float()


def _grads(model):
    return {k.removeprefix("_orig_mod."): p.grad.detach().float().clone() for k, p in model.named_parameters() if p.grad is not None}


def _peak(model, spec, args, args2) -> int:
    def step():
        model.zero_grad(set_to_none=True)
        run_step(model, spec, args, args2)

    step()  # compile, then measure the second step
    return measure(step, repeat=1).peak_bytes


#: Warnings by which memfit says it cannot keep the budget for this step.
CANNOT_KEEP = ("retain_graph=True", "graph break", "Dynamo compiled no graph", "ran again before the backward")


def check(spec: Spec, inner: str = "eager") -> tuple[str, str]:
    """(outcome, detail): "refused", "fit", "warned" (memfit said it cannot keep the budget), "skipped"
    (PyTorch's own ``aot_eager`` cannot run the step either: a user checkpoint region and BatchNorm in
    bf16, called twice before one backward, fail its saved-tensor version check), or "violation" (a
    wrong gradient, an unexplained overshoot, or a crash)."""
    model, args, args2 = build(spec)
    ref = copy.deepcopy(model)
    with torch._functorch.config.patch(donated_buffer=spec.step != "retain_graph"):
        ref_loss = run_step(ref, spec, args, args2)
        ref_grads = _grads(ref)
        torch._dynamo.reset()
        try:
            plain = _peak(torch.compile(copy.deepcopy(model), backend=memfit.backend(inner=inner)), spec, args, args2)
        except Exception as e:  # noqa: BLE001
            torch._dynamo.reset()
            try:  # PyTorch's own aot_eager: when it fails as well, the step is not one torch.compile runs
                _peak(torch.compile(copy.deepcopy(model), backend="aot_eager"), spec, args, args2)
            except Exception:  # noqa: BLE001
                return "skipped", f"aot_eager fails too: {str(e).splitlines()[0][:160]}"
            return "violation", f"crash without a budget {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        budget = max(1, int(plain * spec.frac))
        torch._dynamo.reset()
        m = copy.deepcopy(model)
        compiled = torch.compile(m, backend=memfit.backend(inner=inner, budget=budget))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            try:
                m.zero_grad(set_to_none=True)
                loss = run_step(compiled, spec, args, args2)
                grads = _grads(m)
                peak = _peak(compiled, spec, args, args2)
            except memfit.BudgetError as e:
                return "refused", f"smallest {e.smallest_peak} > budget {budget}"
            except Exception as e:  # noqa: BLE001 - a crash is a violation, reported with its type
                return "violation", f"crash {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        said = [str(x.message) for x in w if any(k in str(x.message) for k in CANNOT_KEEP)]
    rtol = RTOL[torch.bfloat16 if spec.bf16 else torch.float32]
    scale = max(g.abs().max().item() for g in ref_grads.values())
    if grads.keys() != ref_grads.keys():
        return "violation", f"gradients of {sorted(set(grads) ^ set(ref_grads))} missing or extra"
    worst = max((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads)
    if worst > rtol * scale + 1e-6 or abs(loss.item() - ref_loss.item()) > rtol * abs(ref_loss.item()) + 1e-6:
        return "violation", f"gradient off by {worst:.3g} (scale {scale:.3g})"
    if peak <= budget * SLACK:
        return "fit", f"peak {peak} <= budget {budget}"
    if said:
        return "warned", said[0][:160]
    return "violation", f"peak {peak} over budget {budget} ({peak / budget:.3f}x) without a word"
