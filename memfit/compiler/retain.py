"""A warning when a compiled graph's backward runs with ``retain_graph=True``.

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
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten

from memfit.units import format_bytes


def watch_retained_graph(compiled: Callable, name: str, saved_bytes: int, peak_bytes: int, budget: int) -> Callable:
    """``compiled`` (a Dynamo-level compiled function) whose backward warns when it retains its graph."""
    warned = []

    def check(grad_outputs):
        if not warned and torch._C._autograd._get_current_graph_task_keep_graph():
            warned.append(True)
            warnings.warn(
                f"memfit: graph {name} ran its backward with retain_graph=True: autograd keeps the "
                f"{format_bytes(saved_bytes)} its forward saved alive through this backward and the next, so the "
                f"step's peak can exceed the planned {format_bytes(peak_bytes)} (budget {format_bytes(budget)}) by "
                "up to that much; memfit plans a backward that frees them as it goes. Sum the losses and call "
                "backward() once, or plan for a smaller budget",
                stacklevel=2,
            )

    def hook(outs: Any) -> None:
        if warned:
            return
        for t in tree_flatten(outs)[0]:
            if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                t.grad_fn.register_prehook(check)
                return

    @functools.wraps(compiled)  # Dynamo calls the compiled function with the graph's inputs as arguments
    def watched(*args: Any, **kwargs: Any) -> Any:
        out = compiled(*args, **kwargs)
        hook(out)
        return out

    return watched


__all__ = ["watch_retained_graph"]
