"""The weight-gradient queue behind the split backward.

When a graph's backward is split (``passes=[..., "split_backward"]``), autograd's call into the
compiled backward runs only B: it returns the input gradients (so the previous pipeline stage, or
the rest of autograd, can go on) and ``None`` for every parameter, and queues a
:class:`WeightGradTask` holding W and the values B handed to it. Nothing touches ``.grad`` until
the task runs; then it adds each parameter's gradient into ``.grad`` exactly as autograd's
``AccumulateGrad`` would (set when ``None``, else add in place; post-accumulate hooks called).

* :func:`run_weight_grads` runs every queued task (oldest first): call it before the optimizer step.
* :func:`claim_weight_grads` takes the tasks queued since the last claim and returns a runner for
  them: a pipeline stage's ``dw_builder`` (see :mod:`memfit.pipelining`).
* An optimizer step with tasks still queued for its parameters raises :class:`PendingWeightGradsError`
  instead of stepping with incomplete gradients (Megatron-DeepSpeed#442 lost them silently).
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

_ids = itertools.count()
_lock = threading.Lock()
_unclaimed: list["WeightGradTask"] = []
_outstanding: "OrderedDict[int, WeightGradTask]" = OrderedDict()
_hook_handle = None


class PendingWeightGradsError(RuntimeError):
    """An optimizer stepped while weight gradients of its parameters were still queued."""


@dataclass(eq=False)
class WeightGradTask:
    """One W: a compiled weight-gradient graph, its inputs, and the parameters it accumulates into."""

    graph: str
    run_w: Callable[[list], Any]
    handoff: list
    params: list
    id: int = field(default_factory=lambda: next(_ids))
    done: bool = False

    @property
    def held_bytes(self) -> int:
        seen, total = set(), 0
        for t in self.handoff:
            if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
                key = t.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += t.untyped_storage().nbytes()
        return total

    def run(self) -> None:
        if self.done:
            raise RuntimeError(f"memfit: weight-gradient task {self.id} of graph {self.graph} ran twice")
        args, self.handoff = self.handoff, []
        with torch.no_grad():  # as autograd runs a backward (no create_graph)
            grads = self.run_w(args)  # boxed: clears args, so handed-off values die at their last use
        self.done = True
        with _lock:
            _outstanding.pop(self.id, None)
        for p, g in zip(self.params, grads):
            if g is not None:
                accumulate_grad(p, g)
        self.params = []


class SplitBackward:
    """The compiled backward of a split graph, as autograd calls it (boxed: it takes the argument
    list and clears it). Runs B, queues W with the hand-off and the parameters (taken from the
    arguments, so a graph shared by several modules accumulates into the right ones), and returns
    the input gradients with ``None`` for every parameter."""

    def __init__(self, name, plan, run_b, run_w, n_outputs: int, param_args: tuple[int, ...]):
        self._boxed_call = True  # an instance attribute: Dynamo's disable() wrapper copies __dict__ only
        self.name = name
        self.plan = plan
        self.run_b = run_b
        self.run_w = run_w
        self.n_outputs = n_outputs
        self.param_args = param_args

    def __call__(self, args: list) -> list:
        params = [args[i] for i in self.param_args]
        for i, p in zip(self.param_args, params):
            if not (isinstance(p, torch.Tensor) and p.is_leaf and p.requires_grad):
                raise RuntimeError(
                    f"memfit: split backward of graph {self.name}: backward argument {i}, expected to be a parameter "
                    f"(a leaf that requires grad), is not (a copy made by the inner compiler?); its weight gradient "
                    "has nowhere to go. Compile without passes=['split_backward'] for this model, and report it"
                )
        outs = list(self.run_b(args))
        nb = len(self.plan.input_outputs)
        grads: list = [None] * self.n_outputs
        for pos, g in zip(self.plan.input_outputs, outs[:nb]):
            grads[pos] = g
        enqueue(WeightGradTask(self.name, self.run_w, outs[nb:], params))
        return grads


def accumulate_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    """What ``AccumulateGrad`` does with a new gradient ``g`` for leaf ``p``."""
    with torch.no_grad():
        if p.grad is None:
            if g.stride() != p.stride():  # the layout contract: .grad has its parameter's strides
                g = torch.empty_strided(p.shape, p.stride(), dtype=g.dtype, device=g.device).copy_(g)
            p.grad = g.detach()
        else:
            p.grad += g
    hooks = getattr(p, "_post_accumulate_grad_hooks", None)
    for hook in (hooks or {}).values():
        hook(p)


def enqueue(task: WeightGradTask) -> None:
    _install_optimizer_check()
    with _lock:
        _unclaimed.append(task)
        _outstanding[task.id] = task


def pending_weight_grads() -> list[WeightGradTask]:
    """Tasks queued or claimed and not yet run, oldest first."""
    with _lock:
        return list(_outstanding.values())


def run_weight_grads() -> int:
    """Run every queued weight-gradient task, oldest first; returns how many ran."""
    tasks = pending_weight_grads()
    with _lock:
        _unclaimed.clear()
    for t in tasks:
        if not t.done:
            t.run()
    return len(tasks)


def claim_weight_grads() -> Callable[[], None]:
    """Take the tasks queued since the last claim; the returned runner runs them (once).

    A pipeline stage's ``dw_builder``: the stage calls it right after the backward of one
    microbatch (which queued that microbatch's W), and calls the runner when the schedule says W."""
    with _lock:
        tasks = list(_unclaimed)
        _unclaimed.clear()

    def run() -> None:
        for t in tasks:
            if not t.done:
                t.run()

    run.tasks = tasks  # type: ignore[attr-defined]
    return run


def discard_weight_grads() -> int:
    """Drop every queued task without running it (after an exception mid-step, say); returns how many."""
    with _lock:
        n = len(_outstanding)
        _outstanding.clear()
        _unclaimed.clear()
    return n


def _check_optimizer(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    pending = pending_weight_grads()
    if not pending:
        return
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    mine = [t for t in pending if any(id(p) in ids for p in t.params)]
    if mine:
        graphs = sorted({t.graph for t in mine})
        raise PendingWeightGradsError(
            f"memfit: {type(optimizer).__name__}.step() called with {len(mine)} weight-gradient task(s) still queued "
            f"for its parameters (split backward of graph(s) {', '.join(graphs)}): their .grad is incomplete. "
            "Call memfit.run_weight_grads() after backward (a pipeline schedule runs them as W steps), or "
            "memfit.discard_weight_grads() to drop them"
        )


def _install_optimizer_check() -> None:
    global _hook_handle
    if _hook_handle is None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _hook_handle = register_optimizer_step_pre_hook(_check_optimizer)


__all__ = [
    "PendingWeightGradsError",
    "WeightGradTask",
    "claim_weight_grads",
    "discard_weight_grads",
    "enqueue",
    "pending_weight_grads",
    "run_weight_grads",
]
