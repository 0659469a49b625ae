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


def size_bound(x, unbounded: int = 4096, *, shape_env=None) -> int:
    """An int for a size: itself, a backed symbol's hint, or for a data-dependent (unbacked) size such
    as ``nonzero()``'s row count the upper end of the range the shape environment proves for it.
    ``x``: an int, a ``SymInt``, or a sympy expression with its ``shape_env`` (Inductor's sizes).

    The upper end is what a budget can be checked against: a mixture-of-experts router's
    ``(top == i).nonzero()`` is bounded by its token count (256 of 256 tokens, not the 4096 that every
    unbacked size used to be read as, nor the 0 of Inductor's own fallback, which replayed a 1.54 MiB
    step as 906 KiB). ``unbounded``: the size used where no finite bound exists (a size of a size of
    a symbolic input)."""
    if isinstance(x, int):
        return x
    node = getattr(x, "node", None)
    if node is not None and node.has_hint():
        return int(node.hint)
    expr = node.expr if node is not None else x
    env = node.shape_env if node is not None else shape_env
    try:
        upper = env.bound_sympy(expr).upper if env is not None else None
        if upper is not None and upper.is_finite:
            return int(upper)
    except Exception:  # noqa: BLE001 - a bound that cannot be computed is no bound
        pass
    return unbounded


def _unbacked_size(s) -> bool:
    return isinstance(s, torch.SymInt) and not s.node.has_hint()


def unbacked(t) -> bool:
    """Whether tensor ``t`` has a data-dependent (unbacked) size."""
    return isinstance(t, torch.Tensor) and any(_unbacked_size(s) for s in t.shape)


DATA_DEPENDENT = "its size is data-dependent (known only when the step runs), so its codes cannot be laid out ahead"


def data_dependent(gm: torch.fx.GraphModule, *, key: str = "val") -> list[str]:
    """Names of the nodes of ``gm`` whose value has a data-dependent (unbacked) size: their sizes are
    known only at run time, so a technique that cuts or codes them must decline. ``key``: as for
    :func:`has_symbolic_sizes`."""
    out = []
    for n in gm.graph.nodes:
        v = n.meta.get(key)
        for t in v if isinstance(v, (list, tuple)) else [v]:
            sizes = list(t.shape) if isinstance(t, torch.Tensor) else [t] if isinstance(t, _SYM) else []
            if any(_unbacked_size(s) for s in sizes):
                out.append(n.name)
                break
    return out


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
