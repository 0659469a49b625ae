"""The weight-gradient queue behind the split backward.

When a graph's backward is split (``passes=[..., "split_backward"]``), autograd's call into the
compiled backward runs B (the input gradients) and W (the weight gradients) as two graphs. What happens
to W depends on who asked for the split:

* **A plain training loop (the default): W runs in the same backward call**, right after B, and its
  gradients go back to autograd like any backward's. So ``.grad`` is complete when ``backward()``
  returns, and everything that reads gradients (``clip_grad_norm_``, ``torch.autograd.grad``, tensor
  and post-accumulate hooks, DDP/FSDP reductions, ``zero_grad``) sees what eager autograd gives it.
  Outside a pipeline schedule, a pending W buys nothing and could only be observed half-done.
* **Inside** :func:`defer_weight_grads` (a pipeline stage's backward, see :mod:`memfit.pipelining`, or
  a caller that runs W itself): B returns the input gradients with ``None`` for every parameter and
  queues a :class:`WeightGradTask` holding W and the values B handed to it. Nothing touches ``.grad``
  until the task runs; then it adds each parameter's gradient into ``.grad`` as autograd's
  ``AccumulateGrad`` would (the parameter's tensor hooks applied first, then set when ``None`` or added
  in place, then its post-accumulate hooks).

While a W is queued, a read that would see a partial gradient raises :class:`PendingWeightGradsError`
naming the fix: an optimizer ``step()`` (a step pre-hook, for every optimizer), ``Module.zero_grad()``
and ``Optimizer.zero_grad()`` (W would later add last step's gradient into the cleared one),
``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` / ``clip_grads_with_norm_`` over parameters
with W queued. ``torch.autograd.grad`` never defers (it returns gradients, it does not accumulate them):
inside :func:`defer_weight_grads` its W runs in the call. Those guards are installed when deferral is
first used; what they cannot cover:

* a clip function bound to a name before that (``from torch.nn.utils import clip_grad_norm_`` at the top
  of a script) is the unguarded function: it clips what is there. The optimizer check still refuses a
  step while W is queued;
* DDP and FSDP reduce gradients from hooks on each parameter's gradient accumulator, which a deferred W
  does not pass through: do not defer W under them (a pipeline stage wrapped in DDP included);
* code that reads ``p.grad`` directly sees ``None`` (or the previous microbatches' sum) until W runs;
* a parameter's gradient hooks (``p.register_hook``, ``p.register_post_accumulate_grad_hook``) are
  called by autograd during the backward, with ``None`` were its W queued: so a graph whose parameters
  have such hooks runs W in the backward call even inside :func:`defer_weight_grads` (hooks registered
  between B and W are called when W lands).

* :func:`run_weight_grads` runs every queued task (oldest first): call it before the optimizer step.
* :func:`claim_weight_grads` takes the tasks queued since the last claim and returns a runner for
  them: a pipeline stage's ``dw_builder`` (see :mod:`memfit.pipelining`).
* :func:`discard_weight_grads` drops them (after an exception mid-step).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

_ids = itertools.count()
_lock = threading.Lock()
_unclaimed: list["WeightGradTask"] = []
_outstanding: "OrderedDict[int, WeightGradTask]" = OrderedDict()
_hook_handle = None
_defer_depth = 0  # > 0: inside defer_weight_grads(), W is queued (process-wide: CUDA runs backward on engine threads)
_suspend_depth = 0  # > 0: inside torch.autograd.grad, which returns gradients and so never defers
_guards_installed = False


class PendingWeightGradsError(RuntimeError):
    """Something read (or reset) gradients while weight gradients of its parameters were still queued."""


@contextlib.contextmanager
def defer_weight_grads() -> Iterator[None]:
    """Within this context, a split backward queues W (the weight gradients) instead of running it:
    call :func:`run_weight_grads` (or a pipeline schedule's W step) before anything reads ``.grad``.

    A pipeline stage from :func:`memfit.pipelining.pipeline_stage` runs its backward in this context.
    Outside it, W runs in the backward call and ``.grad`` is complete when ``backward()`` returns."""
    global _defer_depth
    _install_guards()
    with _lock:
        _defer_depth += 1
    try:
        yield
    finally:
        with _lock:
            _defer_depth -= 1


def deferring() -> bool:
    """Whether a split backward called now queues W (inside :func:`defer_weight_grads`, and not inside
    ``torch.autograd.grad``)."""
    return _defer_depth > 0 and _suspend_depth == 0


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
        if deferring() and not any(_hooked(p) for p in params):
            enqueue(WeightGradTask(self.name, self.run_w, outs[nb:], params))
            return grads
        # Not deferred, or a parameter has gradient hooks (autograd calls them in this backward, with None
        # if W were queued: a hook expects a gradient, so such a graph's W is not deferred).
        # W now, its gradients handed to autograd with B's (AccumulateGrad, hooks and autograd.grad then see
        # exactly what an unsplit backward gives them).
        handoff = outs[nb:]
        del outs
        with torch.no_grad():
            wgrads = self.run_w(handoff)  # boxed: clears the hand-off, so its values die at their last use
        for pos, g in zip(self.plan.weight_outputs, wgrads):
            grads[pos] = g
        return grads


def _hooked(p: torch.Tensor) -> bool:
    """Whether autograd calls hooks of ``p`` when its gradient is accumulated (tensor hooks, post-accumulate
    hooks): it calls them in the backward even when the gradient is ``None``."""
    return bool(getattr(p, "_backward_hooks", None) or getattr(p, "_post_accumulate_grad_hooks", None))


def accumulate_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    """What ``AccumulateGrad`` does with a new gradient ``g`` for leaf ``p``: its tensor hooks
    (``p.register_hook``) first, each may replace ``g``; then accumulate; then its post-accumulate hooks."""
    for hook in list((getattr(p, "_backward_hooks", None) or {}).values()):
        out = hook(g)
        if out is not None:
            g = out
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


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _check_optimizer(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    tasks = _pending_for(_optimizer_params(optimizer))
    if tasks:
        _refuse(f"{type(optimizer).__name__}.step() called", tasks)


def _pending_for(params) -> list[WeightGradTask]:
    """The queued tasks that will accumulate into any of ``params``."""
    pending = pending_weight_grads()
    if not pending:
        return []
    ids = {id(p) for p in params}
    return [t for t in pending if any(id(p) in ids for p in t.params)]


def _refuse(what: str, tasks: list[WeightGradTask]) -> None:
    graphs = sorted({t.graph for t in tasks})
    raise PendingWeightGradsError(
        f"memfit: {what} with {len(tasks)} weight-gradient task(s) still queued for its parameters (split backward "
        f"of graph(s) {', '.join(graphs)}): their .grad is incomplete. Call memfit.run_weight_grads() first (a "
        "pipeline schedule runs them as W steps), or memfit.discard_weight_grads() to drop them"
    )


def _clip_params(parameters) -> tuple[list, list]:
    """A clip function's first argument as a list (a generator is consumed once: the function gets it)."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    return params, params


def _guard(fn: Callable, what: str, params_of: Callable) -> Callable:
    """``fn(first, ...)`` that refuses while W is queued for the parameters ``params_of(first)`` names
    (it returns the first argument to call ``fn`` with, and the parameters)."""

    @functools.wraps(fn)
    def guarded(first, *args, **kwargs):
        if _outstanding:
            first, params = params_of(first)
            tasks = _pending_for(params)
            if tasks:
                _refuse(what, tasks)
        return fn(first, *args, **kwargs)

    guarded.__memfit_guard__ = fn  # type: ignore[attr-defined]
    return guarded


def _no_defer(fn: Callable) -> Callable:
    """``torch.autograd.grad`` returns gradients instead of accumulating them: a W queued inside it would
    leave its results ``None``, so inside it W runs in the backward call."""

    @functools.wraps(fn)
    def grad(*args, **kwargs):
        global _suspend_depth
        with _lock:
            _suspend_depth += 1
        try:
            return fn(*args, **kwargs)
        finally:
            with _lock:
                _suspend_depth -= 1

    grad.__memfit_guard__ = fn  # type: ignore[attr-defined]
    return grad


def _install_guards() -> None:
    """Install, once, what refuses a read of a partial gradient while W is queued (see the module
    docstring for what they cover and what they cannot)."""
    global _guards_installed
    if _guards_installed:
        return
    import torch.nn.utils as nn_utils
    import torch.nn.utils.clip_grad as clip_grad

    _install_optimizer_check()
    for name in ("clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_"):
        for mod in (nn_utils, clip_grad):
            fn = getattr(mod, name, None)
            if fn is not None and not hasattr(fn, "__memfit_guard__"):
                setattr(mod, name, _guard(fn, f"torch.nn.utils.{name}() called", _clip_params))
    module_zero = torch.nn.Module.zero_grad
    if not hasattr(module_zero, "__memfit_guard__"):
        torch.nn.Module.zero_grad = _guard(module_zero, "Module.zero_grad() called", lambda m: (m, m.parameters()))
    optim_zero = torch.optim.Optimizer.zero_grad
    if not hasattr(optim_zero, "__memfit_guard__"):
        torch.optim.Optimizer.zero_grad = _guard(
            optim_zero, "Optimizer.zero_grad() called", lambda o: (o, _optimizer_params(o)))
    if not hasattr(torch.autograd.grad, "__memfit_guard__"):
        torch.autograd.grad = _no_defer(torch.autograd.grad)
    _guards_installed = True


def _install_optimizer_check() -> None:
    global _hook_handle
    if _hook_handle is None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _hook_handle = register_optimizer_step_pre_hook(_check_optimizer)


__all__ = [
    "PendingWeightGradsError",
    "defer_weight_grads",
    "deferring",
    "WeightGradTask",
    "claim_weight_grads",
    "discard_weight_grads",
    "enqueue",
    "pending_weight_grads",
    "run_weight_grads",
]
