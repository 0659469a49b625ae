"""Plan the split of a backward graph into B (input gradients) and W (weight gradients).

Zero-bubble pipeline schedules run each stage's backward in two parts: B, which the previous stage
waits for, and W, which can run later to fill a bubble. What W needs from B (or from the saved
activations) must stay alive until W runs; everything else is freed after B. So the split has two
goals that pull apart: put as much *work* in W as possible (that is what fills bubbles) while
holding as few *bytes* between B and W as possible.

The plan settles it in two steps:

1. **What must be in B**: every node the input gradients depend on (their backward slice).
2. **Where the rest goes**: weight-gradient work the FLOP counter counts — matmuls and
   convolutions, the work worth moving into a bubble (a linear layer's ``dW = dYᵀ X`` is a third
   of its FLOPs; a transformer block's weight GEMMs are ~45% of its backward) — is pinned to W. Everything else
   (bias sums, norm-weight reductions, casts, views) goes wherever the **minimum cut** on bytes
   held between B and W puts it. So a layer norm's ``dγ = Σ dY·x̂`` is computed in B and only the
   [hidden] result is handed over, instead of holding dY and x̂ ([tokens, hidden] each); a bias
   gradient likewise.

Ops that compute both kinds of gradient in one call (``native_layer_norm_backward``,
``convolution_backward``, the group/batch-norm backwards; ``output_mask`` selects the outputs) are
split into two calls with disjoint masks *only where the weight half then lands in W*: a
convolution's weight gradient is a matmul-class op (pinned to W); a norm's is a reduction the cut
keeps in B, so the fused call is kept whole (one kernel, nothing extra held).

Parameters handed to W cost nothing (they are resident); saved activations and B's intermediates
cost their bytes.

**W may recompute.** With the block checkpointed, B recomputes the block's forward, and W needs some of
those values (each weight GEMM's input). Holding them costs 15 MiB on a GPT block 256 wide, 4 x 256
tokens, against 10 MiB for PyTorch's runtime split, whose W re-runs the checkpointed block. So the cut
may also give W its own copies of deterministic forward values (no incoming gradient among their
inputs, no random op): then their inputs must be available in W instead. :func:`plan_split` plans
with and without and keeps the smaller hold: 9 MiB measured on that block
(benchmarks/split_backward.py). The compiler asks for this only where no budget binds the graph.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.fx
from torch.utils.flop_counter import flop_registry

from memfit.units import format_bytes
from memfit.planner.cost import node_flops, node_vals, tensor_bytes
from memfit.planner.graphs import ancestors as _ancestors

#: Ops that return input and weight gradients together, and the output index of the input gradient.
MIXED_OPS = {
    torch.ops.aten.native_layer_norm_backward.default: 0,
    torch.ops.aten.convolution_backward.default: 0,
    torch.ops.aten.native_group_norm_backward.default: 0,
    torch.ops.aten.native_batch_norm_backward.default: 0,
}

_INF = float("inf")


@dataclass(frozen=True)
class SplitPlan:
    """Which backward outputs and nodes run in W, and what B hands to W.

    Positions index the backward graph's outputs (one per forward input, in order)."""

    input_outputs: tuple[int, ...]
    """Outputs computed in B: gradients of the graph's non-parameter inputs."""
    weight_outputs: tuple[int, ...]
    """Outputs computed in W: gradients of parameters (in the order W returns them)."""
    weight_params: tuple[str, ...]
    """For each weight output, the backward placeholder holding that parameter (W accumulates into
    its ``.grad``)."""
    w_nodes: frozenset[str]
    """Nodes computed in W."""
    handoff: tuple[str, ...]
    """Values B hands to W, in B's output order after the input gradients."""
    held_bytes: int
    """Bytes held between B and W (the handoff, less the parameters among it: those are resident)."""
    b_flops: int
    w_flops: int
    split_ops: tuple[str, ...] = ()
    """Mixed ops split by output mask (the weight half runs in W)."""
    kept_whole: tuple[tuple[str, str], ...] = ()
    """Mixed ops left as one call in B, with the reason."""
    recomputed: tuple[str, ...] = ()
    """Forward values W computes again (from the values saved for the backward) instead of holding them
    from B, in graph order (:func:`duplicate_for_w` adds W's copies)."""
    held_without_recompute: int | None = None
    """Bytes the plan without W recomputing would hold (where the planner weighed both)."""

    @property
    def w_share(self) -> float:
        """W's share of the backward's FLOPs (what can move into a bubble)."""
        total = self.b_flops + self.w_flops
        return self.w_flops / total if total else 0.0

    def describe(self) -> str:
        return (
            f"split backward: {len(self.weight_outputs)} weight gradient(s) deferred to W "
            f"({100 * self.w_share:.0f}% of the backward's FLOPs), {len(self.input_outputs)} input gradient(s) in B; "
            f"{len(self.handoff)} value(s) held between B and W, {format_bytes(self.held_bytes)}"
            + (f"; split by output mask: {', '.join(self.split_ops)}" if self.split_ops else "")
            + (f"; W recomputes {len(self.recomputed)} forward value(s) instead of holding them "
               f"({format_bytes(self.held_without_recompute)} held otherwise)" if self.recomputed else "")
        )

    def to_json(self) -> dict:
        return {
            "input_outputs": list(self.input_outputs),
            "weight_outputs": list(self.weight_outputs),
            "weight_params": list(self.weight_params),
            "handoff": list(self.handoff),
            "held_bytes": self.held_bytes,
            "b_flops": self.b_flops,
            "w_flops": self.w_flops,
            "w_share": self.w_share,
            "split_ops": list(self.split_ops),
            "kept_whole": [list(k) for k in self.kept_whole],
            "recomputed": list(self.recomputed),
            "held_without_recompute": self.held_without_recompute,
        }


class NothingToSplit(Exception):
    """The backward has no weight gradient to defer; the reason says why."""


def _graph_outputs(graph: torch.fx.Graph) -> list:
    return list(next(n for n in reversed(graph.nodes) if n.op == "output").args[0])


def _outputs(bw: torch.fx.GraphModule) -> list:
    return _graph_outputs(bw.graph)


def _value_bytes(n: torch.fx.Node) -> float:
    """Bytes of the value a node produces; a tuple (multi-output op) cannot be handed over itself."""
    val = n.meta.get("val")
    if isinstance(val, (tuple, list)):
        return _INF
    return float(sum(tensor_bytes(v) for v in node_vals(n)))


def is_matmul_class(n: torch.fx.Node) -> bool:
    """Ops the FLOP counter has a formula for (mm, bmm, addmm, convolution, attention...)."""
    return n.op == "call_function" and getattr(n.target, "overloadpacket", None) in flop_registry


def split_mixed_ops(bw: torch.fx.GraphModule, b_roots: list) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """Split every mixed op whose input gradient B needs and whose weight outputs B does not into
    two calls with disjoint ``output_mask`` (in place). Returns (B half, W half) pairs."""
    return _split_mixed_ops(bw.graph, b_roots)


def _split_mixed_ops(graph: torch.fx.Graph, b_roots: list) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """:func:`split_mixed_ops` on a bare graph (the planner rehearses it on a replica, see :func:`plan_split`)."""
    needed = _ancestors(b_roots)
    pairs = []
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target not in MIXED_OPS:
            continue
        mask = n.args[-1]
        idx = MIXED_OPS[n.target]
        if not isinstance(mask, (list, tuple)) or not mask[idx] or not any(m for i, m in enumerate(mask) if i != idx):
            continue
        getitems = [u for u in n.users if u.target is operator.getitem]
        if len(getitems) != len(n.users):
            continue
        # only worth splitting if some weight output is not itself needed by B
        if all(u in needed for u in getitems if u.args[1] != idx):
            continue
        with graph.inserting_after(n):
            w_half = graph.call_function(
                n.target, (*n.args[:-1], [m and i != idx for i, m in enumerate(mask)]), dict(n.kwargs)
            )
        w_half.meta = dict(n.meta)
        w_half.meta["val"] = tuple(v if i != idx else None for i, v in enumerate(n.meta["val"]))
        n.args = (*n.args[:-1], [i == idx for i in range(len(mask))])
        n.meta = dict(n.meta)
        n.meta["val"] = tuple(v if i == idx else None for i, v in enumerate(n.meta["val"]))
        for u in getitems:
            if u.args[1] != idx:
                u.args = (w_half, u.args[1])
        pairs.append((n, w_half))
    return pairs


def merge_mixed_op(bw: torch.fx.GraphModule, b_half: torch.fx.Node, w_half: torch.fx.Node) -> None:
    """Undo :func:`split_mixed_ops` for one op (its weight half landed in B: one call is cheaper)."""
    _merge_mixed_op(bw.graph, b_half, w_half)


def _merge_mixed_op(graph: torch.fx.Graph, b_half: torch.fx.Node, w_half: torch.fx.Node) -> None:
    """:func:`merge_mixed_op` on a bare graph."""
    b_mask, w_mask = b_half.args[-1], w_half.args[-1]
    b_half.args = (*b_half.args[:-1], [a or b for a, b in zip(b_mask, w_mask)])
    b_half.meta["val"] = tuple(a if a is not None else b for a, b in zip(b_half.meta["val"], w_half.meta["val"]))
    for u in list(w_half.users):
        u.args = (b_half, u.args[1])
    graph.erase_node(w_half)


_KEPT_WHOLE_REASON = (
    "its weight gradient is a reduction the minimum cut keeps in B (holding its "
    "[param]-sized result is cheaper than holding its activation-sized inputs)"
)


def resident_inputs(primals: Sequence[str], params: Sequence[bool]) -> set[str]:
    """The inputs that cost nothing to hold between B and W: the parameters (they stay allocated)."""
    return {p for p, is_param in zip(primals, params) if is_param}


def plan_split(
    fw: torch.fx.GraphModule,
    bw: torch.fx.GraphModule,
    *,
    num_fwd_outputs: int,
    primals: Sequence[str],
    params: Sequence[bool] | None,
    recompute: bool | None = None,
) -> SplitPlan:
    """Decide the split of ``bw`` into B and W; neither ``fw`` nor ``bw`` is changed.

    ``recompute``: whether W may compute forward values again from what the backward was given
    instead of holding them from B (what PyTorch's runtime split does for a checkpointed block: its W
    re-runs the block). ``None`` plans both and keeps the one that holds fewer bytes between B and W;
    the cost is W's extra FLOPs, which the plan counts. Fewer bytes held is not a lower step peak: what
    W recomputes from is held from the start of B, where what B hands over otherwise is made late in
    B (a property test found a step at 72.89 KiB against its 69.01 KiB budget, 48.67 KiB held instead
    of 80.31), so the compiler asks for it only where no budget binds the graph.

    ``primals``: the names of the joint graph's primal inputs, in order (one backward output each);
    ``params``: for each, whether it is a parameter. Raises :class:`~memfit.errors.CantApply` when the
    split cannot be carried out on these graphs and :class:`NothingToSplit` when there is no weight
    gradient to defer; either way the graphs are as they were, so the caller compiles them unsplit.

    Why replicas: the plan names nodes, and carrying it out (:func:`memfit.passes.split_backward.carry_out`)
    adds nodes to both graphs before the split (the parameter inputs, the halves of split mixed ops)
    whose names the graphs' namespaces choose. So the planner rehearses those same edits, with the
    pass's own code, on replicas that name new nodes exactly as the originals will; the carried-out
    graphs then hold every node the plan names."""
    from memfit.errors import CantApply
    from memfit.passes.split_backward import add_param_inputs

    if params is None:
        raise CantApply("which inputs of the graph are parameters is unknown (the graph was not traced by Dynamo)")
    from memfit.planner.shapes import data_dependent

    dd = data_dependent(fw) + data_dependent(bw)
    if dd:
        # the run-time sizes AOTAutograd hands the backward shifted its argument positions, so W's
        # parameters were read from the wrong arguments ("expected to be a parameter" under eager,
        # "mismatch in length of strides and shape" under Inductor)
        raise CantApply(f"data-dependent sizes ({', '.join(dd[:3])}): the split needs a backward whose inputs "
                        "are known when it is compiled", "dynamic_shapes")
    n_out = len(_outputs(bw))
    if n_out != len(primals):
        raise CantApply(f"the backward returns {n_out} values for {len(primals)} inputs")
    plans = []
    for again in ((False, True) if recompute is None else (recompute,)):
        fw_graph, bw_graph = replica(fw.graph), replica(bw.graph)
        holders = add_param_inputs(fw_graph, bw_graph, num_fwd_outputs=num_fwd_outputs, primals=primals, params=params)
        plans.append(_plan_graph(bw_graph, set(holders), holders, resident=resident_inputs(primals, params),
                                 recompute=again))
    if len(plans) == 2:
        plain, again = plans
        if again.recomputed and again.held_bytes < plain.held_bytes:
            return dataclasses.replace(again, held_without_recompute=plain.held_bytes)
        return plain
    return plans[0]


def replica(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A copy of ``graph`` (same nodes, same names) that names the nodes later added to it exactly as
    ``graph`` would name them.

    A graph names a new node from its namespace: the names ever used in it (erased nodes' included)
    and a counter per base name. A plain copy starts a fresh namespace, so the second
    ``convolution_backward`` half the split adds could be ``convolution_backward_2`` in the copy and
    ``convolution_backward_5`` in the original. Node metadata is shared, as in ``Graph.__deepcopy__``
    (a shallow copy of each ``meta``): the planner replaces, never mutates, the values in it."""
    copied = torch.fx.Graph(tracer_cls=graph._tracer_cls, tracer_extras=graph._tracer_extras)
    got = copied.graph_copy(graph, {}, return_output_node=True)
    if got is not None:
        value, old_output = got
        new_output = copied.output(value, type_expr=getattr(old_output, "type", None))
        new_output.meta = copy.copy(old_output.meta)
    copied._graph_namespace._used_names = set(graph._graph_namespace._used_names)
    copied._graph_namespace._base_count = dict(graph._graph_namespace._base_count)
    return copied


def plan(
    bw: torch.fx.GraphModule,
    param_outputs: set[int],
    param_placeholders: dict[int, str],
    *,
    resident: set[str] = frozenset(),
) -> SplitPlan:
    """Plan the split of ``bw`` (modified in place only to split mixed ops by output mask).

    ``param_outputs``: positions of the backward outputs that are parameter gradients;
    ``param_placeholders``: for each of them, the name of the backward placeholder that holds the
    parameter (see :func:`memfit.passes.split_backward.ensure_params`); ``resident``: placeholder
    names that cost nothing to hold (parameters, buffers).

    The old sequence (``ensure_params``, then this, then ``apply``) changes the graphs before it can
    refuse; the compiler uses :func:`plan_split`, which decides without changing them. This stays for the
    tests that hold the two sequences equal (tests/test_split_backward.py)."""
    return _plan_graph(bw.graph, param_outputs, param_placeholders, resident=resident)


def _plan_graph(
    graph: torch.fx.Graph,
    param_outputs: set[int],
    param_placeholders: dict[int, str],
    *,
    resident: set[str] = frozenset(),
    recompute: bool = False,
) -> SplitPlan:
    """:func:`plan` on a bare graph, in its steps: which outputs go where, split the mixed ops, the
    minimum cut, re-merge the mixed ops the cut kept in B, W's copies of the forward values it
    recomputes, then what B hands to W and the FLOPs."""
    outs = _graph_outputs(graph)
    w_pos = tuple(i for i, o in enumerate(outs) if i in param_outputs and isinstance(o, torch.fx.Node))
    b_pos = tuple(i for i, o in enumerate(outs) if i not in param_outputs and isinstance(o, torch.fx.Node))
    if not w_pos:
        raise NothingToSplit("the backward computes no parameter gradient (no parameter of this graph requires grad)")
    b_roots = [outs[i] for i in b_pos]
    pairs = _split_mixed_ops(graph, b_roots)
    w_nodes, again = _min_cut_w_nodes(graph, outs, b_pos, w_pos, resident, recompute)
    split_ops, kept = _settle_mixed_ops(graph, pairs, w_nodes)
    recomputed = [n.name for n in graph.nodes if n in again]
    if recomputed:
        w_nodes |= set(duplicate_for_w(graph, recomputed, {n.name for n in w_nodes}).values())
    handoff = _handoff(graph, outs, w_pos, w_nodes)
    held = sum(int(_value_bytes(n)) for n in handoff if not (n.op == "placeholder" and n.name in resident))
    w_flops = sum(node_flops(n) for n in w_nodes)
    b_flops = sum(node_flops(n) for n in graph.nodes if n.op == "call_function" and n not in w_nodes)
    return SplitPlan(
        input_outputs=b_pos,
        weight_outputs=w_pos,
        weight_params=tuple(param_placeholders[i] for i in w_pos),
        w_nodes=frozenset(n.name for n in w_nodes),
        handoff=tuple(n.name for n in handoff),
        held_bytes=held,
        b_flops=b_flops,
        w_flops=w_flops,
        split_ops=tuple(split_ops),
        kept_whole=tuple(kept),
        recomputed=tuple(recomputed),
    )


def duplicate_for_w(graph: torch.fx.Graph, names: Sequence[str], w_names: set[str]) -> dict[torch.fx.Node, torch.fx.Node]:
    """Give W its own copies of the nodes ``names`` (in graph order, each right after its original,
    reading the copies of its inputs where there are), and make the W nodes (``w_names``) read the
    copies. Returns original -> copy. The planner (on a replica) and the pass (on the graph)
    both call this, in the same state, so the copies get the same names."""
    wanted = set(names)
    copies: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in list(graph.nodes):
        if n.name not in wanted:
            continue
        with graph.inserting_after(n):
            c = graph.call_function(n.target, torch.fx.node.map_arg(n.args, lambda a: copies.get(a, a)),
                                    torch.fx.node.map_arg(n.kwargs, lambda a: copies.get(a, a)))
        c.meta = copy.copy(n.meta)
        copies[n] = c
    made = set(copies.values())
    for n, c in copies.items():
        n.replace_all_uses_with(c, delete_user_cb=lambda u: u.name in w_names and u not in made)
    return copies


def _recomputable(n: torch.fx.Node, tangent_free: set[torch.fx.Node]) -> bool:
    """A forward value W may compute again: a deterministic op that reads no incoming gradient."""
    if n.op != "call_function" or n not in tangent_free:
        return False
    if n.target is operator.getitem:  # an output of a multi-output op (layer norm, attention)
        return True
    if not isinstance(n.target, torch._ops.OpOverload):
        return False
    return torch.Tag.nondeterministic_seeded not in n.target.tags and not n.target._schema.is_mutable


def _tangent_free(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    free: set[torch.fx.Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder":
            if not n.name.startswith("tangents"):
                free.add(n)
        elif n.op == "call_function" and all(a in free for a in n.all_input_nodes):
            free.add(n)
    return free


def _min_cut_w_nodes(
    graph: torch.fx.Graph, outs: list, b_pos: tuple[int, ...], w_pos: tuple[int, ...], resident: set[str],
    recompute: bool = False,
) -> tuple[set[torch.fx.Node], set[torch.fx.Node]]:
    """The nodes the minimum cut on bytes held between B and W puts in W (matmul-class work pinned there),
    and, with ``recompute``, the forward values B computes that W computes again instead of holding.

    With ``recompute``, a deterministic forward value n that B computes and W needs gets a third node
    (n, "w"), on the sink side when W computes n again: then n's inputs must be available in W (held or
    recomputed in turn) and n's own bytes are not held. The cut then weighs holding a checkpointed
    block's recomputed activations against holding its saved input and recomputing them in W.

    (n, "in") on the source side: n is computed in B (placeholders and what the input gradients need
    are tied there); on the sink side: in W (matmul-class candidates are tied there). (n, "out") on
    the sink side: n is available in W. The edge in -> out has capacity = bytes of n's value, so a
    value computed in B and available in W (handed over) costs its bytes."""
    import networkx as nx

    b_required = _ancestors(outs[i] for i in b_pos)
    w_needed = _ancestors(outs[i] for i in w_pos)
    candidates = [n for n in graph.nodes if n in w_needed and n not in b_required and n.op == "call_function"]
    g = nx.DiGraph()
    src, sink = "SOURCE", "SINK"
    cand = set(candidates)
    free = _tangent_free(graph) if recompute else set()
    dup = {n for n in graph.nodes if n in b_required and n in w_needed and _recomputable(n, free)
           and not any(outs[i] is n for i in w_pos)}
    for n in graph.nodes:
        if n.op == "output":
            continue
        if n not in cand and n not in b_required and n.op != "placeholder":
            continue  # dead or unrelated
        cap = 0.0 if n.op == "placeholder" and n.name in resident else _value_bytes(n)
        if recompute and n.op == "call_function" and not isinstance(n.meta.get("val"), (torch.Tensor, int, torch.SymInt)):
            # a multi-output op's tuple (or a higher-order op's, like run_with_rng_state's) cannot be handed
            # over: W computes it again or reads its items from B
            cap = _INF
        if n in dup:  # held (bytes) unless W computes it again from inputs available in W
            g.add_edge((n, "w"), (n, "out"), capacity=cap)
            g.add_edge((n, "out"), (n, "w"), capacity=_INF)
            for a in n.all_input_nodes:
                g.add_edge((a, "out"), (n, "w"), capacity=_INF)
        else:
            g.add_edge((n, "in"), (n, "out"), capacity=cap)
        g.add_edge((n, "out"), (n, "in"), capacity=_INF)
        if n not in cand:
            g.add_edge(src, (n, "in"), capacity=_INF)
        elif is_matmul_class(n):
            g.add_edge((n, "in"), sink, capacity=_INF)
        for a in n.all_input_nodes:
            g.add_edge((a, "out"), (n, "in"), capacity=_INF)  # n in W needs a available in W
            g.add_edge((n, "in"), (a, "in"), capacity=_INF)  # n in B needs a computed in B
    for i in w_pos:  # what W returns must reach the sink side (computed in W or handed over)
        g.add_edge((outs[i], "out"), sink, capacity=_INF)
    if sink not in g:
        g.add_node(sink)
    try:
        _, (s_side, _t) = nx.minimum_cut(g, src, sink)
    except nx.NetworkXUnbounded:  # only W recomputing can make every cut infinite: plan without it
        if not recompute:
            raise
        return _min_cut_w_nodes(graph, outs, b_pos, w_pos, resident, False)
    return {n for n in cand if (n, "in") not in s_side}, {n for n in dup if (n, "w") not in s_side}


def _settle_mixed_ops(
    graph: torch.fx.Graph, pairs: list[tuple[torch.fx.Node, torch.fx.Node]], w_nodes: set[torch.fx.Node]
) -> tuple[list[str], list[tuple[str, str]]]:
    """Keep split the mixed ops whose weight half the cut put in W; merge the others back into one
    fused call (in place). Returns the split ops' names and the kept-whole ones with the reason."""
    split_ops, kept = [], []
    for b_half, w_half in pairs:
        if w_half in w_nodes:
            split_ops.append(b_half.name)
        else:
            kept.append((b_half.name, _KEPT_WHOLE_REASON))
            _merge_mixed_op(graph, b_half, w_half)
    return split_ops, kept


def _handoff(
    graph: torch.fx.Graph, outs: list, w_pos: tuple[int, ...], w_nodes: set[torch.fx.Node]
) -> list[torch.fx.Node]:
    """The values B hands to W, in graph order: what a W node reads, and what W returns but B computes."""
    handoff: list[torch.fx.Node] = []
    for n in graph.nodes:
        if n in w_nodes or n.op == "output":
            continue
        if any(u in w_nodes for u in n.users) or any(outs[i] is n for i in w_pos):
            handoff.append(n)
    return handoff
