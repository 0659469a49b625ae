"""Warnings when a planned graph's step is not the step memfit planned: a backward run with
``retain_graph=True``, or the graph run again before its previous call's backward.

memfit plans a backward that frees each saved forward value after its last use, as autograd does by
default. ``loss.backward(retain_graph=True)`` keeps every saved value alive through that backward and
until the graph is freed, so the step's peak rises by up to the bytes the forward saved: a 2-block MLP
whose plan fit a 5.33 MB budget measured 6.44 MB with a second backward, and nothing said so. The
compiled function cannot re-plan at that point (the forward has already run), so it says it, once per
graph, with the bytes at stake and the fix.

The check is a pre-hook on the graph's backward node, registered on each call of the compiled forward
(one ``register_prehook`` per step); it asks autograd whether the running backward keeps its graph
(``torch._C._autograd._get_current_graph_task_keep_graph``, which AOTAutograd itself reads to decide
whether it may free what the backward holds).
"""

from __future__ import annotations

import functools
import warnings
import weakref
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten

from memfit.units import format_bytes


def watch_retained_graph(compiled: Callable, name: str, saved_bytes: int, peak_bytes: int, budget: int, *,
                         concurrent_calls: bool = False) -> Callable:
    """``compiled`` (a Dynamo-level compiled function) whose backward warns when it retains its graph,
    and whose forward warns when it runs again while an earlier call's backward has not run (two calls'
    saved values alive at once: a conv net called twice in one step measured 1.43x a budget its one
    call fits). Each warning once per graph."""
    warned: set[str] = set()
    pending: list = []  # weak references to the backward nodes of calls whose backward has not run

    def say(kind: str, text: str) -> None:
        if kind not in warned:
            warned.add(kind)
            warnings.warn(text, stacklevel=3)

    def check(grad_outputs):
        if torch._C._autograd._get_current_graph_task_keep_graph():
            say("retain", (
                f"memfit: graph {name} ran its backward with retain_graph=True: autograd keeps the "
                f"{format_bytes(saved_bytes)} its forward saved alive through this backward and the next, so the "
                f"step's peak can exceed the planned {format_bytes(peak_bytes)} (budget {format_bytes(budget)}) by "
                "up to that much; memfit plans a backward that frees them as it goes. Sum the losses and call "
                "backward() once, or plan for a smaller budget"
            ))

    def done(node):
        def prehook(grad_outputs):
            pending[:] = [r for r in pending if r() is not None and r() is not node]
            check(grad_outputs)
        return prehook

    def hook(outs: Any) -> None:
        pending[:] = [r for r in pending if r() is not None]  # a graph freed without a backward is gone
        if pending and not concurrent_calls:
            say("twice", (
                f"memfit: graph {name} ran again before the backward of its previous call: both calls' saved "
                f"values ({format_bytes(saved_bytes)} each) are alive at once, and memfit planned the step for one "
                f"(planned peak {format_bytes(peak_bytes)}, budget {format_bytes(budget)}). Call backward() after "
                "each call (gradients accumulate), or plan for a smaller budget"
            ))
        for t in tree_flatten(outs)[0]:
            if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                node = t.grad_fn
                node.register_prehook(done(node))
                try:
                    pending.append(weakref.ref(node))
                except TypeError:  # a node type without weak references: the second warning is off
                    pass
                return

    @functools.wraps(compiled)  # Dynamo calls the compiled function with the graph's inputs as arguments
    def watched(*args: Any, **kwargs: Any) -> Any:
        out = compiled(*args, **kwargs)
        hook(out)
        return out

    return watched


__all__ = ["watch_retained_graph"]
