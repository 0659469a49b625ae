"""Split-backward pass: carry out a :class:`~memfit.planner.split_backward.SplitPlan`.

The backward graph becomes two graphs:

* **B** takes the backward's inputs (saved values, then incoming gradients) and returns the input
  gradients followed by the values W needs (the hand-off). Everything else B made is freed when it
  returns; the saved activations only W reads stay alive through the hand-off, the rest die with B.
* **W** takes the hand-off and returns the parameter gradients, which the runtime
  (:mod:`memfit.runtime`) accumulates into each parameter's ``.grad`` when W is run.

W must know *which* tensors to accumulate into. A compiled graph can serve several modules (the
same block class compiled once and called for every layer), so the parameters are taken from the
backward's own arguments at run time: :func:`ensure_params` makes the partition hand every
parameter that has a gradient to the backward (a parameter is resident, so this costs no memory).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.fx

from memfit.passes import CantApply
from memfit.planner.split_backward import SplitPlan


def _output_node(gm: torch.fx.GraphModule) -> torch.fx.Node:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def ensure_params(
    fw: torch.fx.GraphModule,
    bw: torch.fx.GraphModule,
    *,
    num_fwd_outputs: int,
    primals: Sequence[str],
    params: Sequence[bool],
) -> dict[int, str]:
    """Make ``bw`` take every parameter whose gradient it returns; returns, per gradient position,
    the name of the backward placeholder holding that parameter.

    The forward returns its user outputs, then the values saved for the backward (tensors, then
    symbolic sizes); the backward takes the saved values in the same order, then the incoming
    gradients. A missing parameter goes into the first saved slot of both: right after the forward's
    user outputs, and as the backward's first placeholder."""
    outs = list(_output_node(bw).args[0])
    placeholders = [n for n in bw.graph.nodes if n.op == "placeholder"]
    by_name = {n.name: n for n in placeholders}
    fw_ph = {n.name: n for n in fw.graph.nodes if n.op == "placeholder"}
    fw_out = _output_node(fw)
    found: dict[int, str] = {}
    for i, (name, is_param) in enumerate(zip(primals, params)):
        if not is_param or i >= len(outs) or not isinstance(outs[i], torch.fx.Node):
            continue
        if name not in by_name:
            if name not in fw_ph:
                raise CantApply(f"parameter input {name} is not an input of the forward graph")
            with bw.graph.inserting_before(placeholders[0] if placeholders else None):
                p = bw.graph.placeholder(name)
            p.meta = dict(fw_ph[name].meta)
            by_name[name] = p
            placeholders.insert(0, p)
            fw_args = list(fw_out.args[0])
            fw_args.insert(num_fwd_outputs, fw_ph[name])
            fw_out.args = (tuple(fw_args),)
        found[i] = name
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
