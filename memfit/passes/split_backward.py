"""Split-backward pass: carry out a :class:`~memfit.planner.split_backward.SplitPlan`.

The backward graph becomes two graphs:

* **B** takes the backward's inputs (saved values, then incoming gradients) and returns the input
  gradients followed by the values W needs (the hand-off). Everything else B made is freed when it
  returns; the saved activations only W reads stay alive through the hand-off, the rest die with B.
* **W** takes the hand-off and returns the parameter gradients, which the runtime
  (:mod:`memfit.runtime`) accumulates into each parameter's ``.grad`` when W is run.

W must know *which* tensors to accumulate into. A compiled graph can serve several modules (the
same block class compiled once and called for every layer), so the parameters are taken from the
backward's own arguments at run time: :func:`add_param_inputs` makes the partition hand every
parameter that has a gradient to the backward (a parameter is resident, so this costs no memory).

The planner decides (:func:`memfit.planner.split_backward.plan_split`, which changes no graph and
is where a split is refused); :func:`carry_out` then makes every change: the parameter inputs, the
mixed ops split by output mask, and the B and W graphs.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.fx

from memfit.errors import CantApply
from memfit.planner import split_backward as split_planner
from memfit.planner.split_backward import SplitPlan


def _output_node(gm: torch.fx.GraphModule) -> torch.fx.Node:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def carry_out(
    fw: torch.fx.GraphModule,
    bw: torch.fx.GraphModule,
    plan: SplitPlan,
    *,
    num_fwd_outputs: int,
    primals: Sequence[str],
    params: Sequence[bool],
) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """Carry out ``plan`` (from :func:`~memfit.planner.split_backward.plan_split` on these same ``fw``
    and ``bw``, with the same arguments): returns the B and W graphs.

    In place, as the planner rehearsed it: ``fw`` hands the backward every parameter whose gradient it
    returns and ``bw`` takes them (:func:`ensure_params`); in ``bw``, the mixed ops the plan splits
    by output mask are split (the others are split and merged back, exactly as the planner did, so
    that the nodes added next are named as in the plan). B and W are new graphs; ``bw`` keeps the
    whole backward."""
    ensure_params(fw, bw, num_fwd_outputs=num_fwd_outputs, primals=primals, params=params)
    _split_mixed_ops_as_planned(bw, plan)
    return apply(bw, plan)


def _split_mixed_ops_as_planned(bw: torch.fx.GraphModule, plan: SplitPlan) -> None:
    """Split the mixed ops of ``bw`` as the planner did: all that it split, then merge back those it
    kept whole (in the planner's order, so that the graph's namespace names the kept halves as it did);
    then add W's copies of the forward values it recomputes.

    Checks that the graph then holds every node the plan names: a plan made for other graphs is a
    caller's bug, and carrying it out would build wrong B and W graphs silently."""
    outs = list(_output_node(bw).args[0])
    pairs = split_planner.split_mixed_ops(bw, [outs[i] for i in plan.input_outputs])
    split = set(plan.split_ops)
    for b_half, w_half in pairs:
        if b_half.name not in split:
            split_planner.merge_mixed_op(bw, b_half, w_half)
    if plan.recomputed:  # W's own copies of the forward values it computes again, named as in the plan
        split_planner.duplicate_for_w(bw.graph, plan.recomputed, set(plan.w_nodes))
        bw.recompile()
    names = {n.name for n in bw.graph.nodes}
    halves = sorted(b.name for b, _ in pairs)
    planned = sorted([*plan.split_ops, *(op for op, _ in plan.kept_whole)])
    absent = sorted((plan.w_nodes | set(plan.handoff)) - names)
    if halves != planned or absent:
        raise RuntimeError(
            "split backward: the plan was not made for these graphs (mixed ops split: "
            f"{halves} here, {planned} in the plan; nodes the plan names but the graph lacks: {absent[:5]})"
        )


def add_param_inputs(
    fw_graph: torch.fx.Graph,
    bw_graph: torch.fx.Graph,
    *,
    num_fwd_outputs: int,
    primals: Sequence[str],
    params: Sequence[bool],
) -> dict[int, str]:
    """Make ``bw_graph`` take every parameter whose gradient it returns; returns, per gradient
    position, the name of the backward placeholder holding that parameter.

    The forward returns its user outputs, then the values saved for the backward (tensors, then
    symbolic sizes); the backward takes the saved values in the same order, then the incoming
    gradients. A missing parameter goes into the first saved slot of both: right after the forward's
    user outputs, and as the backward's first placeholder.

    On bare graphs (no recompile), so that the planner can rehearse it on replicas; raises
    :class:`~memfit.errors.CantApply`, possibly after adding some inputs."""
    outs = list(next(n for n in reversed(bw_graph.nodes) if n.op == "output").args[0])
    placeholders = [n for n in bw_graph.nodes if n.op == "placeholder"]
    by_name = {n.name: n for n in placeholders}
    fw_ph = {n.name: n for n in fw_graph.nodes if n.op == "placeholder"}
    fw_out = next(n for n in reversed(fw_graph.nodes) if n.op == "output")
    found: dict[int, str] = {}
    for i, (name, is_param) in enumerate(zip(primals, params)):
        if not is_param or i >= len(outs) or not isinstance(outs[i], torch.fx.Node):
            continue
        if name not in by_name:
            if name not in fw_ph:
                raise CantApply(f"parameter input {name} is not an input of the forward graph")
            with bw_graph.inserting_before(placeholders[0] if placeholders else None):
                p = bw_graph.placeholder(name)
            p.meta = dict(fw_ph[name].meta)
            by_name[name] = p
            placeholders.insert(0, p)
            fw_args = list(fw_out.args[0])
            fw_args.insert(num_fwd_outputs, fw_ph[name])
            fw_out.args = (tuple(fw_args),)
        found[i] = name
    return found


def ensure_params(
    fw: torch.fx.GraphModule,
    bw: torch.fx.GraphModule,
    *,
    num_fwd_outputs: int,
    primals: Sequence[str],
    params: Sequence[bool],
) -> dict[int, str]:
    """:func:`add_param_inputs` on ``fw`` and ``bw``, then regenerate their code."""
    found = add_param_inputs(fw.graph, bw.graph, num_fwd_outputs=num_fwd_outputs, primals=primals, params=params)
    fw.recompile()
    bw.recompile()
    return found


def apply(bw: torch.fx.GraphModule, plan: SplitPlan) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """The B and W graphs of ``plan`` (``bw`` itself is not changed)."""
    outs = list(_output_node(bw).args[0])
    w_nodes = plan.w_nodes
    handoff = set(plan.handoff)

    b_graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in bw.graph.nodes:
        if n.op == "output" or n.name in w_nodes:
            continue
        env[n] = b_graph.node_copy(n, env.__getitem__)
    by_name = {n.name: n for n in bw.graph.nodes}
    b_graph.output(tuple(env[outs[i]] for i in plan.input_outputs) + tuple(env[by_name[h]] for h in plan.handoff))
    b_graph.eliminate_dead_code()

    w_graph = torch.fx.Graph()
    w_env: dict[torch.fx.Node, torch.fx.Node] = {}
    for h in plan.handoff:
        src = by_name[h]
        p = w_graph.placeholder(h)
        p.meta = dict(src.meta)
        w_env[src] = p
    for n in bw.graph.nodes:
        if n.name in w_nodes:
            w_env[n] = w_graph.node_copy(n, w_env.__getitem__)
    w_graph.output(tuple(w_env[outs[i]] for i in plan.weight_outputs))
    missing = [n.name for n in w_graph.nodes if n.op == "placeholder" and n.name not in handoff]
    if missing:  # cannot happen with a plan from the planner; a hand-made plan is checked
        raise CantApply(f"W reads values B does not hand over: {missing[:5]}")
    b = torch.fx.GraphModule(bw, b_graph)
    w = torch.fx.GraphModule(bw, w_graph)
    for gm, part in ((b, "B"), (w, "W")):
        gm.meta = dict(bw.meta)
        gm.meta["memfit_split_part"] = part
    return b, w
