"""Carry out a :class:`~memfit.planner.stream.StreamPlan`: each region becomes one opaque op that
runs the region chunk by chunk along the sequence, in the forward and in the backward.

This module is the graph rewrite only. The op and what it does when it runs (the chunk graphs, the
registry of regions) are in :mod:`memfit.kernels.stream`; so are the op's memory and time models,
which the planner takes from :func:`memfit.kernels.op_models`.

The rewrite is made on the Dynamo graph, traced to ATen ops (``to_aten``), before AOTAutograd. A
region is replaced by ``memfit::stream(key, inputs) -> outputs``, a custom op whose autograd formula
is ``memfit::stream_backward``. Both are opaque to AOTAutograd and Inductor, so:

* the forward saves only the region's inputs (the partitioner sees nothing else to save);
* the chunks really run one after another: Inductor cannot fuse them back into one kernel (it does
  when chunks are plain slices in one graph: that is why its own auto-chunker wraps each chunk in a
  subgraph); ``benchmarks/stream.py`` measures the peak to prove it;
* each chunk runs two small ATen graphs traced at compile time — ``forward(c)`` and ``backward(c)``
  (the chunk's VJP, traced with ``make_fx`` through ``autograd.grad``), so no autograd runs at step time.

When the region's only differentiable output is a token reduction (the loss), the chunk's backward
runs in the forward right after the chunk (``grad_in_forward``; Liger's fused linear cross-entropy does
the same by hand): the op returns the loss and the gradients of its inputs for a unit incoming
gradient, and the backward multiplies them by the incoming gradient. Nothing is recomputed.

The memory model sees the op's outputs as usual plus its chunk's own peak (the op's ``scratch``
model), and the cost model prices it as its chunk graphs times the chunk count.
"""

from __future__ import annotations

import operator
from typing import Any, Sequence

import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch._subclasses.fake_tensor import FakeTensorMode

from memfit.errors import CantApply
from memfit.kernels.stream import REGISTRY, Acc, Region, register
from memfit.planner.stream import RegionPlan, StreamPlan, Tok

aten = torch.ops.aten

# ``REGISTRY`` is memfit.kernels.stream.REGISTRY (the same dict), re-exported for the tests that look up
# the regions a compiled graph names.
__all__ = ["REGISTRY", "apply", "fake_inputs", "needs_grad", "to_aten"]


# -- the traced forward graph ------------------------------------------------------------------------
def fake_inputs(example_inputs: Sequence[Any], mode: FakeTensorMode) -> list:
    """Static fake copies of the inputs in ``mode`` (real or fake from another mode), keeping requires_grad."""
    out = []
    with mode:
        for x in example_inputs:
            if isinstance(x, torch.Tensor):
                f = torch.empty_strided(tuple(int(s) for s in x.shape), tuple(int(s) for s in x.stride()),
                                        dtype=x.dtype, device=x.device)
                out.append(f.requires_grad_(True) if x.requires_grad else f)
            else:
                out.append(x)
    return out


def to_aten(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> torch.fx.GraphModule:
    """The Dynamo graph traced to ATen ops with static shapes (``meta['val']`` on every node).

    A fresh FakeTensorMode with no ShapeEnv: tracing under Dynamo's own mode records ``sym_size``
    nodes and adds guards to Dynamo's ShapeEnv that it then fails to build (seen on HF Llama).

    Traced with the Python dispatcher on, as AOTAutograd traces plain ``torch.compile``'s graphs: ops
    without a kernel of their own then decompose as they do there. Without it, ``F.dropout`` on CPU
    became ATen's C++ ``empty_like + bernoulli_ + div_ + mul`` (a float32 noise tensor saved for the
    backward, 4x the bytes of ``native_dropout``'s bool mask), and Inductor's CPU fallback for that
    ``bernoulli_`` (https://github.com/pytorch/pytorch/pull/97002) was fused out of order: its consumer
    read the noise buffer before the fallback had filled it, and an HF GPT-2 with attention dropout 0.1
    streamed under Inductor trained on a NaN loss.
    """
    from torch._dispatch.python import enable_python_dispatcher

    mode = FakeTensorMode()
    fakes = fake_inputs(example_inputs, mode)
    with mode, enable_python_dispatcher():
        traced = make_fx(_GradModeTagger(gm).run, tracing_mode="real")(*fakes)
    traced.graph.eliminate_dead_code()
    traced.recompile()
    return traced


class _GradModeTagger(torch.fx.Interpreter):
    """Runs the Dynamo graph node by node under ``make_fx`` and marks every ATen node a node made while
    grad mode was off (``meta['memfit_no_grad']``).

    The trace records ops, not grad mode: an EMA buffer updated under ``torch.no_grad()`` from the hidden
    states, then read by the forward (``h - ema``), looked differentiable, and the streamed region's
    gradient added the path through the EMA (fc.bias's gradient 9% off). :func:`needs_grad` stops at
    these nodes, as autograd does."""

    def run_node(self, n):
        from torch.fx.experimental.proxy_tensor import get_proxy_mode

        mode = get_proxy_mode()
        graph = mode.tracer.graph if mode is not None else None
        last = graph._root.prev if graph is not None else None
        out = super().run_node(n)
        if graph is not None and not torch.is_grad_enabled():
            node = graph._root.prev
            while node is not last and node is not graph._root:
                node.meta["memfit_no_grad"] = True
                node = node.prev
        return out


def needs_grad(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> set:
    """The nodes whose values have a gradient (floating values downstream of an input that requires one):
    a region returns gradients for these inputs only, and only such outputs get an incoming gradient."""
    out = set()
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for n, x in zip(ph, example_inputs):
        if isinstance(x, torch.Tensor) and x.requires_grad:
            out.add(n)
    for n in gm.graph.nodes:
        if n.meta.get("memfit_no_grad"):
            continue  # made under torch.no_grad(): no gradient flows through it (see _GradModeTagger)
        if n.op == "call_function" and any(a in out for a in n.all_input_nodes):
            v = n.meta.get("val")
            vals = v if isinstance(v, (list, tuple)) else [v]
            if any(isinstance(t, torch.Tensor) and (t.dtype.is_floating_point or t.dtype.is_complex) for t in vals):
                out.add(n)
    return out


# -- the rewrite ---------------------------------------------------------------------------------------
def _build(gm: torch.fx.GraphModule, rp: RegionPlan, seq: int, need: set, layouts: dict, by: dict) -> Region:
    """The runtime :class:`~memfit.kernels.stream.Region` of ``rp``: its nodes copied into a graph of their
    own (marked with how a chunk runs each: token layout, reduction, attention mode) and how each output
    of the op is assembled from the chunks (rows written in place, or partial sums added)."""
    g = torch.fx.Graph()
    env: dict = {}
    xs_meta = []
    attn_modes = dict(rp.attentions)
    reductions = {}  # token reductions: the node itself, or the nll_loss_forward behind an item
    for name, lay in zip(rp.outputs, rp.output_layouts):
        if isinstance(lay, str):
            n = by[name]
            reductions[n.args[0].name if "[" in lay else name] = lay.split("[")[0]
    for name in rp.inputs:
        a = by[name]
        p = g.placeholder(name)
        p.meta = dict(a.meta)
        env[a] = p
        v = a.meta["val"]
        xs_meta.append((tuple(v.shape), v.dtype, v.device, tuple(v.stride())))
    for name in rp.nodes:
        n = by[name]
        m = g.node_copy(n, lambda x: env[x])
        lay = layouts.get(n)
        if isinstance(lay, Tok):
            m.meta["memfit_tok"] = lay
        if name in reductions:
            m.meta["memfit_reduce"] = reductions[name]
        if name in attn_modes:
            m.meta["memfit_attn"] = attn_modes[name]  # a member attention: which keys a chunk reads
        env[n] = m
    tok_outputs, tok_names, accs, outputs, out_meta, out_nodes = [], [], [], [], [], []
    acc_index: dict = {}

    def acc_for(node, kind):
        if node.name not in acc_index:
            src, out = node.args[0].meta["val"], node.meta["val"]
            out0 = out[0] if isinstance(out, (list, tuple)) else out
            count = src.numel() // max(out0.numel(), 1)
            acc_index[node.name] = len(accs)
            accs.append(Acc(node.name, kind, count, out0.dtype))
        return acc_index[node.name]

    for name, lay in zip(rp.outputs, rp.output_layouts):
        n = by[name]
        v = n.meta["val"]
        if isinstance(lay, Tok):
            outputs.append(("tok", len(tok_outputs)))
            tok_outputs.append((len(outputs) - 1, lay, tuple(v.shape), v.dtype))
            tok_names.append(name)
        elif "[" in lay:  # an item of nll_loss_forward: (loss, total weight)
            kind, item = lay.split("[")[0], int(lay.split("[")[1].rstrip("]"))
            outputs.append(("acc", acc_for(n.args[0], kind), item))
        else:
            outputs.append(("acc", acc_for(n, lay), 0))
        out_nodes.append(n)
        out_meta.append((tuple(v.shape), v.dtype, _dense_strides(v)))
    for j, a in enumerate(accs):  # the backward of a mean over nll needs its total weight
        if a.width == 2 and ("acc", j, 1) not in outputs:
            nll = by[a.node]
            w = nll.meta["val"][1]
            outputs.append(("acc", j, 1))
            out_nodes.append(None)
            out_meta.append((tuple(w.shape), w.dtype, tuple(w.stride())))
    g.output(tuple(env[by[name]] for name in rp.nodes[-1:]))  # placeholder output; chunks pick their own
    body = torch.fx.GraphModule(gm, g)
    region = Region(
        plan=rp, seq=seq, body=body, input_layouts=rp.input_layouts,
        needs=tuple(by[name] in need for name in rp.inputs),
        tok_outputs=tok_outputs, accs=accs, outputs=outputs, out_meta=out_meta,
    )
    region._nodes = {n.name: n for n in body.graph.nodes}
    region._tok_names = tok_names
    region._tok_diff = {name: by[name] in need and by[name].meta["val"].dtype.is_floating_point for name in tok_names}
    region._acc_diff = {a.node: by[a.node] in need for a in accs}
    region._xs_meta = xs_meta
    region._out_nodes = out_nodes
    return region


def _dense_strides(v: torch.Tensor) -> tuple[int, ...]:
    """The value's strides when they are a plain layout (a transposed view keeps them: a later ``view``
    may rely on them); contiguous ones for an ``expand``ed value, whose repeated rows cannot be written."""
    from torch._prims_common import is_non_overlapping_and_dense_or_false as dense

    return tuple(v.stride()) if dense(v) else tuple(torch.empty(v.shape, device="meta").stride())


def _toposort(graph: torch.fx.Graph) -> None:
    """Reorder nodes so every node follows its inputs (the op was put after the region's last node;
    an outside user of an early region output may sit before it), keeping the order otherwise."""
    done: set = set()
    order: list = []

    def visit(n):
        stack = [(n, False)]
        while stack:
            x, expanded = stack.pop()
            if x in done:
                continue
            if expanded:
                done.add(x)
                order.append(x)
                continue
            stack.append((x, True))
            for a in reversed(x.all_input_nodes):
                if a not in done:
                    stack.append((a, False))

    nodes = list(graph.nodes)
    for n in nodes:
        visit(n)
    out = next(n for n in nodes if n.op == "output")
    cursor = None
    for n in order:
        if n.op == "placeholder" or n is out:
            continue
        if cursor is None:
            last_ph = [p for p in nodes if p.op == "placeholder"]
            cursor = last_ph[-1] if last_ph else None
            if cursor is None:
                graph.inserting_before(nodes[0])
        if cursor is not None:
            cursor.append(n)
        cursor = n


def apply(gm: torch.fx.GraphModule, plan: StreamPlan, need: set, layouts: dict) -> list[Region]:
    """Replace each region of ``plan`` in ``gm`` (an ATen graph from :func:`to_aten`) by one stream op."""
    by = {n.name: n for n in gm.graph.nodes}
    made = []
    for rp in plan.regions:
        region = _build(gm, rp, plan.seq_len, need, layouts, by)
        region.prepare()
        key = register(region)
        last = by[rp.nodes[-1]]
        region_nodes = {name: by[name] for name in rp.nodes}
        with gm.graph.inserting_after(last):
            op = gm.graph.call_function(torch.ops.memfit.stream.default, (key, [by[i] for i in rp.inputs]))
        with FakeTensorMode(allow_non_fake_inputs=True):
            vals = [torch.empty_strided(shape, stride, dtype=dtype) for shape, dtype, stride in region.out_meta]
        op.meta["val"] = vals
        for k in ("stack_trace", "nn_module_stack", "source_fn_stack"):  # the report's "source" column
            if k in last.meta:
                op.meta[k] = last.meta[k]
        cursor = op
        for i, n in enumerate(region._out_nodes):
            with gm.graph.inserting_after(cursor):
                item = gm.graph.call_function(operator.getitem, (op, i))
            item.meta = dict(n.meta) if n is not None else {}
            item.meta["val"] = vals[i]  # the layout the op really returns (a later region is traced for it)
            cursor = item
            if n is not None:
                n.replace_all_uses_with(item)
                by[n.name] = item  # a later region may take it as an input
                if n in need:
                    need.add(item)
        for name in reversed(rp.nodes):
            node = region_nodes[name]
            if node.users:
                raise CantApply(f"stream region {rp.name}: {name} is still used outside the region by {list(node.users)}")
            gm.graph.erase_node(node)
        made.append(region)
        region.key = key
        gm.meta.setdefault("memfit_stream_keys", []).append(key)
    _toposort(gm.graph)
    _views_to_reshapes(gm)
    gm.graph.lint()
    gm.recompile()
    return made


def _views_to_reshapes(gm: torch.fx.GraphModule) -> None:
    """Turn the ``view``s left outside the regions into ``reshape``s.

    :func:`to_aten` drops a ``.contiguous()`` whose input was already contiguous when it traced, and
    the ``view`` after it then assumes that layout. Traced again (AOTAutograd, after the rewrite), an
    op may lay its output out otherwise: the CPU flash attention's output came back ``[B, H, T, D]``-
    contiguous where the first trace had it ``[B, T, H, D]``, and ``view(transpose(attn), [B, T, C])``
    failed ("Cannot view a tensor ... as a tensor with shape"; a 4-layer GPT under
    ``passes=["stream", "checkpoint"]``). A ``reshape`` is that same view wherever the view is legal,
    and a copy (what the dropped ``.contiguous()`` did) where it is not."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is aten.view.default:
            n.target = aten.reshape.default
