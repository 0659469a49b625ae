"""Graph utilities shared by planners: connected groups of FX nodes, the nodes some roots need, and copies
of graph modules."""

from __future__ import annotations

from typing import Callable, Iterable, TypeVar

N = TypeVar("N")


def connected_groups(nodes: Iterable[N], inputs: Callable[[N], Iterable[N]], joined: Callable[[N, N], bool]) -> list[list[N]]:
    """``nodes`` split into groups connected by the edges ``(a, n)``, ``a`` in ``inputs(n)`` and among
    ``nodes``, for which ``joined(a, n)`` holds (union-find with path halving). Each group keeps the order
    of ``nodes``, and the groups come in the order of their first node.

    Used by the stream planner (regions: row-local ops at one level) and by the few-bit chain matcher
    (the backward components that read an activation's chain)."""
    order = list(nodes)
    parent = {n: n for n in order}

    def root(n):
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in order:
        for a in inputs(n):
            if a in parent and joined(a, n):
                parent[root(a)] = root(n)
    groups: dict = {}
    for n in order:
        groups.setdefault(root(n), []).append(n)
    return list(groups.values())


def ancestors(roots: Iterable) -> set:
    """``roots`` (the FX nodes among them) and every node they read, transitively.

    Used by the split-backward planner (what B needs) and the share-norms planner (what the forward's
    outputs need: the rest of a joint graph runs for the backward)."""
    import torch.fx

    seen: set = set()
    stack = [r for r in roots if isinstance(r, torch.fx.Node)]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def copy_graph_module(gm, *, lazy: bool = False, rewrite: Callable | None = None):
    """A copy of ``gm`` with nodes of its own (each node's ``meta`` a shallow copy; the example values
    themselves shared), ``rewrite(node)`` applied to each new node. ``lazy``: its Python code is generated
    only if it is asked for (a copy that is analysed, never run, skips codegen: 3.4 s over a stream
    search's 15 copies of the Llama-3-8B config's graphs).

    Used by the stream search (a probe's joint graph, planned again with other regions behind its stream
    ops) and by the stream regions (a twin's chunk graphs, each region compiling its own)."""
    import torch.fx
    from torch.fx._lazy_graph_module import _LazyGraphModule

    graph = torch.fx.Graph()
    graph._codegen = gm.graph._codegen  # AOTAutograd's joint graph takes its inputs as a pytree
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    if rewrite is not None:
        for n in graph.nodes:
            rewrite(n)
    copy = (_LazyGraphModule if lazy else torch.fx.GraphModule)(gm, graph)
    copy.meta = dict(gm.meta)
    return copy


__all__ = ["ancestors", "connected_groups", "copy_graph_module"]
