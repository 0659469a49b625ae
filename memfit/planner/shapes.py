"""Whether a graph has symbolic sizes: the one test behind every technique's dynamic-shape refusal.

memfit plans for sizes it can count: a checkpoint plan compares byte counts, the stream pass needs a
fixed sequence length to cut into chunks. A graph compiled with ``dynamic=True`` (or after Dynamo marks
a size dynamic on a recompile) carries ``SymInt`` sizes instead, and each technique then refuses with
``CantApply(..., "dynamic_shapes")`` and its own words for what it needs.
"""

from __future__ import annotations

import torch
import torch.fx

_SYM = (torch.SymInt, torch.SymFloat, torch.SymBool)


def _symbolic_value(v) -> bool:
    for t in v if isinstance(v, (list, tuple)) else [v]:
        if isinstance(t, _SYM):
            return True
        if isinstance(t, torch.Tensor) and any(not isinstance(s, int) for s in t.shape):
            return True
    return False


def has_symbolic_sizes(gm: torch.fx.GraphModule, *, key: str = "val", placeholders_only: bool = False) -> bool:
    """Whether a value of ``gm`` (its inputs only, with ``placeholders_only``) is a symbolic scalar or a
    tensor with a symbolic size; ``key`` names the node meta holding the values (``"val"`` in AOTAutograd
    and ATen graphs, ``"example_value"`` in Dynamo's)."""
    return any(
        _symbolic_value(n.meta.get(key))
        for n in gm.graph.nodes
        if not placeholders_only or n.op == "placeholder"
    )


def symbolic_inputs(example_inputs) -> bool:
    """Whether a graph's example inputs hold anything but tensors (Dynamo passes sizes as ``SymInt``) or
    a tensor with a symbolic size."""
    return any(not isinstance(x, torch.Tensor) or _symbolic_value(x) for x in example_inputs)


__all__ = ["has_symbolic_sizes", "symbolic_inputs"]
