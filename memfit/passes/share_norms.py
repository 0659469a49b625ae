"""Share-norms pass: each planned norm's backward reads its output ``y``, not its input ``x``.

For each site of a :class:`~memfit.planner.share_norms.SharePlan` the backward side of the joint graph
(every node the forward's outputs do not need) gets ``x̂ = (y - β) / γ`` (``y / γ``, or ``y``, as the
norm's affine is), and every read it made of a value of the norm's forward is rewritten in terms of it:

* ``x̂`` -> the recovered ``x̂``; ``x̂ * γ`` -> ``y - β``; ``x - mean`` -> ``x̂ / rstd``;
* an RMSNorm's ``x`` (its written-out backward reads it through ``pow`` and ``mul``) -> ``x̂ / rstd``;
* a decomposed LayerNorm backward's own recomputation of ``x - mean`` -> ``x̂ / rstd``;
* ``native_layer_norm_backward(dy, x, shape, mean, rstd, γ, β)`` -> the same op on ``x̂`` with a zero
  mean and a unit rstd (it then computes exactly ``dx / rstd``, ``dγ`` and ``dβ``), and ``dx`` scaled
  by ``rstd``: one fused kernel, as before.

Each recovery costs one or two pointwise ops in the backward (fused by Inductor), no recompute of the
forward, and rounds within a few float32 ulps (the test holds gradients to eager's at 1e-5). Nothing
in the forward changes, so the partitioner that runs next (AOTAutograd's default, Inductor's min-cut,
or a checkpoint plan) simply no longer finds ``x`` read by the backward.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from memfit.errors import CantApply
from memfit.passes.fewbit import _set_meta, clone  # noqa: F401  (clone: the backend copies with it)
from memfit.planner.share_norms import NormSite, SharePlan, _forward_needed, is_centering

aten = torch.ops.aten


def _call(graph: torch.fx.Graph, target, args: tuple, like: torch.fx.Node) -> torch.fx.Node:
    node = graph.call_function(target, args)
    vals = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args]
    _set_meta(node, target(*vals), like)
    # a backward node, wherever ``like`` ran: the default partitioner places every node before the last
    # forward-tagged one in the forward (a recovery tagged like ``y`` pulled the backward into it)
    node.meta["partitioner_tag"] = "is_backward"
    return node


def apply(joint: torch.fx.GraphModule, plan: SharePlan, num_fwd_outputs: int) -> list[str]:
    """Rewrite ``joint`` in place (call it on a copy); returns the inputs that the backward no longer
    reads. Raises :class:`CantApply` if a site's input is still read by the backward afterwards."""
    graph = joint.graph
    by_name = {n.name: n for n in graph.nodes}
    order = {n: i for i, n in enumerate(graph.nodes)}
    fwd = _forward_needed(joint, num_fwd_outputs)
    freed: list[str] = []
    for site in plan.sites:
        _share(graph, by_name, order, fwd, site)
        x = by_name[site.input]
        still = [u.name for u in x.users if u not in fwd]
        if still:
            raise CantApply(f"{site.kind} {site.input}: the backward still reads its input in {still[0]} after the rewrite")
        freed.append(site.input)
    graph.lint()
    joint.recompile()
    return freed


def _share(graph, by_name, order, fwd, site: NormSite) -> None:
    get = lambda name: by_name[name] if name is not None else None  # noqa: E731
    x, y, rstd, mean = get(site.input), get(site.output), get(site.rstd), get(site.mean)
    w, b, xhat, centered, scaled = (get(site.weight), get(site.bias), get(site.xhat), get(site.centered),
                                    get(site.scaled))
    old_bw = get(site.backward_op)
    # every backward-side read of the norm's forward values, before any node is added
    reads = [(u, v) for v in (x, centered, xhat, scaled) if v is not None for u in list(v.users) if u not in fwd]
    if not reads:
        return
    first = min((u for u, _ in reads), key=order.__getitem__)
    needed = [n for n in (y, rstd, mean, w, b) if n is not None]
    if any(order[n] > order[first] for n in needed):
        raise CantApply(f"{site.kind} {site.input}: the backward reads it before its output is made")
    with graph.inserting_before(first):
        rec = y
        if b is not None:
            rec = _call(graph, aten.sub.Tensor, (y, b), y)
        scaled_rec = rec
        if w is not None:
            rec = _call(graph, aten.div.Tensor, (rec, w), y)
        xhat_rec = rec
        centered_rec = _call(graph, aten.div.Tensor, (xhat_rec, rstd), y) if site.kind != "layer_norm" else None
    recovered = {xhat: xhat_rec, centered: centered_rec, scaled: scaled_rec}
    if site.kind == "rms_norm":
        recovered[x] = centered_rec  # an RMSNorm does not centre: x = x̂ / rstd
    for u, v in reads:
        if u is old_bw:
            continue
        if v is x and site.kind == "layer_norm_decomposed":
            # the decomposed backward recomputes x - mean from x: that is the recovered x - mean
            if is_centering(u, x, mean):
                u.replace_all_uses_with(centered_rec)
                graph.erase_node(u)
                continue
            raise CantApply(f"{site.kind} {site.input}: read by {u.name} in the backward")
        new = recovered.get(v)
        if new is None:
            raise CantApply(f"{site.kind} {site.input}: {u.name} reads {v.name}, which has no recovery")
        u.replace_input_with(v, new)
    if old_bw is not None:
        _replace_native_backward(graph, old_bw, xhat_rec, rstd)


def _replace_native_backward(graph, old: torch.fx.Node, xhat_rec: torch.fx.Node, rstd: torch.fx.Node) -> None:
    """``native_layer_norm_backward`` on the recovered ``x̂`` with mean 0 and rstd 1, ``dx`` times rstd."""
    dy, _, shape, mean, _, w, b, mask = old.args
    with graph.inserting_before(old):
        zero = _call(graph, aten.zeros_like.default, (mean,), old)
        one = _call(graph, aten.ones_like.default, (rstd,), old)
        new = graph.call_function(aten.native_layer_norm_backward.default, (dy, xhat_rec, shape, zero, one, w, b, mask))
        vals = aten.native_layer_norm_backward.default(
            dy.meta["val"], xhat_rec.meta["val"], shape, zero.meta["val"], one.meta["val"],
            w.meta["val"] if w is not None else None, b.meta["val"] if b is not None else None, mask)
        new.meta.update({k: v for k, v in old.meta.items() if k != "val"})
        new.meta["val"] = vals
    for g in list(old.users):
        if g.target is not operator.getitem:
            raise CantApply(f"native_layer_norm_backward {old.name} is read by {g.name}, not through getitem")
        i = g.args[1]
        with graph.inserting_before(g):
            item = graph.call_function(operator.getitem, (new, i))
            item.meta.update(g.meta)
            if i == 0:
                item = _call(graph, aten.mul.Tensor, (item, rstd), g)
        g.replace_all_uses_with(item)
        graph.erase_node(g)
    graph.erase_node(old)


__all__ = ["apply"]
