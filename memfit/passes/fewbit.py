"""Few-bit pass: derivative ops read a packed code of the activation's input, not a saved tensor.

For each site of a :class:`~memfit.planner.fewbit.FewbitPlan` the joint graph gets, in the
forward, ``codes = memfit::fewbit_pack(x, boundaries, bits)`` right after the activation's input
``x`` is made, and in the backward ``memfit::fewbit_grad(grad, codes, levels, bits)`` in place of
the derivative op (``gelu_backward(grad, x)`` and the like). The forward value ``f(x)`` is the
model's own op, untouched. For a chain site (an activation written as several ops, such as
Hugging Face's ``gelu_new``) the whole backward component the planner proved to compute
``grad * f'(x)`` becomes one ``memfit::fewbit_grad``, and the forward nodes only it read (the
``3 * x**2`` of GPT-2's GELU) are removed with it.

Partitioning is done from the partition the graph would have had without the pass (AOTAutograd's
default partition, or Inductor's min-cut): the same values are saved and recomputed, except that
each site's saved tensor is dropped when nothing else in the backward (or in what the backward
recomputes) still reads it, and its codes are saved instead. Stock partitioners cannot be used on
the rewritten graph: they place a forward value that no forward output needs (the codes) in the
backward, which would save ``x`` to pack it there.

Inductor decomposes derivative ops while tracing, so the backend holds their decompositions back
(:data:`HELD_BACK`) when the few-bit pass is on; :func:`decompose` applies them afterwards to
whatever the pass left, so Inductor sees the graph it would have seen.

Also here: :func:`calibrate`, which measures the inputs of the activations of a real run, for
tables weighted by the real distribution instead of a standard normal.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.fx
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from memfit.kernels import fewbit as kernels  # noqa: F401  (registers the memfit:: ops)
from memfit.kernels import fewbit_tables as tables
from memfit.errors import CantApply
from memfit.planner.fewbit import RULES, Calibration, FewbitPlan, backward_nodes

aten = torch.ops.aten

#: Decompositions to hold back while tracing for the few-bit pass (the derivative ops it matches).
HELD_BACK = frozenset(RULES)


def clone(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` with its own graph (same node names; node meta copied shallowly)."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    rv, old_output = graph.graph_copy(gm.graph, env, return_output_node=True)
    graph.output(rv).meta.update(old_output.meta)
    new = torch.fx.GraphModule(gm, graph)
    new.meta.update(gm.meta)
    return new


def _copy_provenance(node: torch.fx.Node, like: torch.fx.Node) -> None:
    """Source line, module path and partitioner tag of ``like`` (what reports and partitioners read).

    ``fwd_nn_module_stack`` too: a backward op carries its layer only there, and the checkpoint
    planner keys layers by it. Without it, a 4-layer GPT's decomposed GELU derivatives were a layer
    apart from their inputs and the smallest checkpoint plan under ``auto`` with approximation allowed
    was 58.07 MiB instead of 48.09 (so ``auto`` fell back to few-bit, 1.55x slower)."""
    for key in ("stack_trace", "nn_module_stack", "fwd_nn_module_stack", "source_fn_stack", "fwd_source_fn_stack",
                "seq_nr", "partitioner_tag"):
        if key in like.meta:
            node.meta[key] = like.meta[key]


def _set_meta(node: torch.fx.Node, val: Any, like: torch.fx.Node) -> None:
    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    _copy_provenance(node, like)
    node.meta["val"] = val
    node.meta["tensor_meta"] = _extract_tensor_metadata(val)


def apply(joint: torch.fx.GraphModule, plan: FewbitPlan) -> dict[str, str]:
    """Rewrite ``joint`` in place; returns {site's saved value: its codes node} (for a chain site, each
    forward value its backward read, and each node removed with it)."""
    by_name = {n.name: n for n in joint.graph.nodes}
    graph = joint.graph
    codes_of: dict[str, str] = {}
    for site in plan.sites:
        deriv, code_of = by_name.get(site.backward), by_name.get(site.code_of)
        if deriv is None or code_of is None:
            raise CantApply(f"the plan names {site.backward}/{site.code_of}, which are not in the graph")
        with graph.inserting_after(code_of):
            codes = graph.call_function(
                torch.ops.memfit.fewbit_pack.default, (code_of, list(site.boundaries), site.bits)
            )
        _set_meta(codes, torch.ops.memfit.fewbit_pack.default(code_of.meta["val"], list(site.boundaries), site.bits), code_of)
        grad = by_name.get(site.grad) if site.replaced else deriv.args[0]
        if grad is None:
            raise CantApply(f"the plan names the gradient {site.grad}, which is not in the graph")
        with graph.inserting_before(deriv):
            new = graph.call_function(torch.ops.memfit.fewbit_grad.default, (grad, codes, list(site.levels), site.bits))
        _set_meta(new, torch.ops.memfit.fewbit_grad.default(grad.meta["val"], codes.meta["val"], list(site.levels), site.bits), deriv)
        deriv.replace_all_uses_with(new)
        graph.erase_node(deriv)
        codes_of[site.saved] = codes.name
        if site.replaced:
            for name in (*site.also_saved, *_erase_dead(graph, [by_name[n] for n in site.replaced if n != site.backward])):
                codes_of[name] = codes.name
    graph.lint()
    joint.recompile()
    return codes_of


def _erase_dead(graph: torch.fx.Graph, start: list[torch.fx.Node]) -> list[str]:
    """Erase ``start`` (a chain site's backward component, now unused) and whatever only it read;
    returns the names erased."""
    erased: list[str] = []
    stack = list(start)
    while stack:
        n = stack.pop()
        if n.graph is not graph or n.users or n.op != "call_function" or n.name in erased:
            continue
        inputs = n.all_input_nodes
        erased.append(n.name)
        graph.erase_node(n)
        stack.extend(inputs)
    return erased


def decompose(gm: torch.fx.GraphModule, targets: Iterable[Any], table: dict | None = None) -> int:
    """Replace each call of an op in ``targets`` by its decomposition (Inductor's table), inline."""
    from torch._guards import detect_fake_mode
    from torch.fx.experimental.proxy_tensor import make_fx

    if table is None:
        from torch._inductor.decomposition import select_decomp_table

        table = select_decomp_table()
    targets = set(targets)
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in targets:
            continue
        flat, spec = tree_flatten((node.args, node.kwargs))
        tensor_pos = [i for i, a in enumerate(flat) if isinstance(a, torch.fx.Node)]
        vals = [flat[i].meta["val"] for i in tensor_pos]

        def fn(*tensors, _flat=flat, _spec=spec, _pos=tensor_pos, _target=node.target):
            items = list(_flat)
            for i, t in zip(_pos, tensors):
                items[i] = t
            args, kwargs = tree_unflatten(items, _spec)
            return _target(*args, **kwargs)

        with detect_fake_mode(vals) or torch._subclasses.fake_tensor.FakeTensorMode():
            sub = make_fx(fn, decomposition_table=table)(*vals)
        env: dict[torch.fx.Node, Any] = {}
        placeholders = iter(flat[i] for i in tensor_pos)
        result = None
        for sn in sub.graph.nodes:
            if sn.op == "placeholder":
                env[sn] = next(placeholders)
            elif sn.op == "output":
                result = tree_map(lambda a: env[a] if isinstance(a, torch.fx.Node) else a, sn.args[0])
            elif sn.op == "call_function":
                with gm.graph.inserting_before(node):
                    new = gm.graph.node_copy(sn, lambda a: env[a])
                val = sn.meta.get("val")
                _copy_provenance(new, node)
                if isinstance(val, torch.Tensor):
                    _set_meta(new, val, node)
                env[sn] = new
            else:
                raise CantApply(f"the decomposition of {node.target} needs {sn.op} nodes; it cannot be inlined")
        if not isinstance(result, torch.fx.Node):
            raise CantApply(f"the decomposition of {node.target} did not give one tensor")
        node.replace_all_uses_with(result)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def saved_names(bw: torch.fx.GraphModule) -> list[str]:
    """The forward values a backward graph receives (its non-tangent placeholders)."""
    from torch._functorch.partitioners import _is_tangent

    return [n.name for n in bw.graph.nodes if n.op == "placeholder" and not _is_tangent(n) and not n.name.startswith("bwd_seed")]


def saved_after(joint: torch.fx.GraphModule, baseline_saved: list[str], codes_of: dict[str, str]) -> set[str]:
    """The values to save once the rewrite is done: the baseline's, plus every site's codes, less each
    site's tensor when nothing in the backward (or in what the baseline recomputes there) reads it."""
    by_name = {n.name: n for n in joint.graph.nodes}
    # a chain site erases forward nodes the baseline may have saved for the backward it replaced
    missing = [s for s in baseline_saved if s not in by_name and s not in codes_of]
    bw = backward_nodes(joint)
    bad = [s for s in baseline_saved if s in by_name and by_name[s] in bw]
    if missing or bad:
        raise CantApply(
            f"the baseline partition saves values that are not forward values of the rewritten graph ({(missing + bad)[:3]})"
        )
    saved = {s for s in baseline_saved if s in by_name} | set(codes_of.values())
    # forward values the backward reads that are not saved: the baseline recomputes them there
    recomputed: set[torch.fx.Node] = set()
    # (the output node is not one of them: the forward values it returns are the forward's outputs, made
    # in the forward; counting them made a chain's inputs look recomputed through its unsaved result)
    stack = [a for n in bw if n.op != "output" for a in n.all_input_nodes
             if a not in bw and a.name not in saved and a.op != "placeholder"]
    while stack:
        n = stack.pop()
        if n in recomputed:
            continue
        recomputed.add(n)
        stack.extend(a for a in n.all_input_nodes if a.name not in saved and a.op != "placeholder")
    for value in codes_of:
        node = by_name.get(value)
        if node is None:
            continue
        if not any(u in bw or u in recomputed for u in node.users):
            saved.discard(value)
    return saved


# -- calibration -----------------------------------------------------------------------------------
_FORWARD_KIND = {
    aten.gelu.default: "gelu",
    aten.silu.default: "silu",
    aten.sigmoid.default: "sigmoid",
    aten.tanh.default: "tanh",
    aten.softplus.default: "softplus",
    aten.elu.default: "elu",
    aten.mish.default: "mish",
    aten.relu.default: "relu",
    aten.leaky_relu.default: "leaky_relu",
}


class _Recorder(TorchDispatchMode):
    def __init__(self, lo: float, hi: float, bins: int):
        super().__init__()
        self.lo, self.hi, self.bins = lo, hi, bins
        self.counts: dict[str, torch.Tensor] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = _FORWARD_KIND.get(func)
        if kind is not None and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            x = args[0].detach().float().clamp(self.lo, self.hi).reshape(-1).cpu()
            h = torch.histc(x, bins=self.bins, min=self.lo, max=self.hi).double()
            self.counts[kind] = self.counts.get(kind, 0) + h
        return func(*args, **(kwargs or {}))


def calibrate(fn: Callable, *args: Any, lo: float = -8.0, hi: float = 8.0, bins: int = 1600, **kwargs: Any) -> Calibration:
    """Run ``fn(*args, **kwargs)`` eagerly and histogram the inputs of every activation it calls.

    Pass the result as ``fewbit_calibration=`` to weight each activation's table by the measured
    distribution of its inputs (per activation kind; values outside [lo, hi] count in the end bins).
    """
    rec = _Recorder(lo, hi, bins)
    with torch.no_grad(), rec:
        fn(*args, **kwargs)
    if not rec.counts:
        raise ValueError("calibration saw no activation (gelu, silu, sigmoid, tanh, softplus, elu, mish, relu, leaky_relu) run")
    return Calibration(
        tuple(sorted((k, tables.Histogram(lo, hi, tuple(c.tolist()))) for k, c in rec.counts.items()))
    )
