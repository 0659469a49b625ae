"""Few-bit plan: which activation derivatives get a packed code instead of a saved tensor.

A site is a backward derivative op (``gelu_backward(grad, x)``, ``sigmoid_backward(grad, y)``,
...) whose full-precision argument is saved for nothing else: replacing it by a ``bits``-bit code
of the activation's input removes the saved tensor and adds ``ceil(n / 8) * bits`` bytes (2 bits
of an fp32 tensor: 16x fewer bytes). Where that argument is also used by another backward op (a
ReLU output that the next linear layer needs for its weight gradient, say) it is saved anyway and
the codes would only add bytes: the site is skipped and the reason kept for the report.

Activations written as several ops (Hugging Face's ``gelu_new``, ``gelu_fast``, ``quick_gelu``, ...)
have no derivative op: :mod:`memfit.planner.fewbit_chains` finds their chains and proves what
their backward computes; such a site replaces the whole backward chain (8 ops and 4 saved fp32
tensors for GPT-2's ``gelu_new`` under the default partition) by one ``memfit::fewbit_grad``. A
matched chain takes precedence over the single-op rules for the derivative ops inside it (GPT-2's
``tanh_backward`` was coded as a ``tanh`` site before: 18.2% error at 2 bits and ``x`` still saved).

Whether the plan is worth carrying out at all is decided on the whole graph by the memory model,
after partitioning (the backend compares the predicted peaks with and without it): Inductor's
min-cut partition often already saves only one of ``x`` and ``f(x)`` and recomputes the other, in
which case few-bit codes add 1/16 and save nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx

from memfit.kernels import fewbit_tables as tables
from memfit.kernels.fewbit import packed_numel
from memfit.planner.cost import tensor_bytes
from memfit.planner.memory import source_of
from memfit.planner.shapes import DATA_DEPENDENT, unbacked

aten = torch.ops.aten


@dataclass(frozen=True)
class Rule:
    """How to read one derivative op: where its saved argument is and which table it needs."""

    saved_arg: int
    """Position of the saved tensor among the op's arguments."""
    uses_output: bool
    """True when the saved argument is the activation's output ``y`` (then the code is of the
    input of the forward op that made ``y``)."""
    kind: Callable[[torch.fx.Node], tuple[str, float | None] | str]
    """(table kind, parameter), or a string saying why this call cannot be rewritten."""
    forward: Any = None
    """For ``uses_output``: the forward op that must have produced the saved argument."""


def _arg(node: torch.fx.Node, i: int, name: str, default: Any) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _gelu(n):
    approximate = _arg(n, 2, "approximate", "none")
    return ("gelu_tanh", None) if approximate == "tanh" else ("gelu", None)


def _softplus(n):
    return ("softplus", float(_arg(n, 2, "beta", 1.0)))


def _elu(n):
    alpha, scale = _arg(n, 1, "alpha", 1.0), _arg(n, 2, "scale", 1.0)
    input_scale, is_result = _arg(n, 3, "input_scale", 1.0), _arg(n, 4, "is_result", False)
    if is_result:
        return "elu's backward uses its output here (in-place elu); only the input form is rewritten"
    if scale != 1 or input_scale != 1:
        return f"elu with scale={scale}, input_scale={input_scale} (selu/celu) has no table"
    return ("elu", float(alpha))


def _threshold(n):
    if _arg(n, 2, "threshold", None) != 0:
        return "threshold_backward with a non-zero threshold is not relu's"
    return ("relu", None)


def _leaky(n):
    if _arg(n, 3, "self_is_result", False):
        return "leaky_relu's backward uses its output here (in-place); only the input form is rewritten"
    return ("leaky_relu", float(_arg(n, 2, "negative_slope", 0.01)))


#: Derivative ops memfit can rewrite. Their Inductor decompositions are held back while tracing a
#: graph for the few-bit pass, so they reach the joint graph intact (see ``passes.fewbit``).
RULES: dict[Any, Rule] = {
    aten.gelu_backward.default: Rule(1, False, _gelu),
    aten.silu_backward.default: Rule(1, False, lambda n: ("silu", None)),
    aten.mish_backward.default: Rule(1, False, lambda n: ("mish", None)),
    aten.softplus_backward.default: Rule(1, False, _softplus),
    aten.elu_backward.default: Rule(5, False, _elu),
    aten.leaky_relu_backward.default: Rule(1, False, _leaky),
    aten.sigmoid_backward.default: Rule(1, True, lambda n: ("sigmoid", None), aten.sigmoid.default),
    aten.tanh_backward.default: Rule(1, True, lambda n: ("tanh", None), aten.tanh.default),
    aten.threshold_backward.default: Rule(1, True, _threshold, aten.relu.default),
}


@dataclass(frozen=True)
class FewbitSite:
    backward: str
    """The derivative node that becomes ``memfit::fewbit_grad``."""
    saved: str
    """The forward value it read (no longer needed by the backward)."""
    code_of: str
    """The forward value whose code is packed (the activation's input)."""
    kind: str
    param: float | None
    bits: int
    boundaries: tuple[float, ...]
    levels: tuple[float, ...]
    saved_bytes: int
    """Bytes of ``saved`` (and, for a chain site, of ``also_saved``: every value its backward read, which
    AOTAutograd's default partition saves; Inductor's min-cut saves the activation's input alone, so
    there the record's predicted peaks, not this, say what the site saves: GPT-2 ``gelu_new``, 2 x 32
    tokens, width 256: 256 KiB here, 64 KiB under the min-cut)."""
    code_bytes: int
    rel_error: float
    """Relative L2 error of the input gradient under the table's weighting (normal or calibrated)."""
    module: str = ""
    source: str = ""
    grad: str = ""
    """Chain sites: the backward value (the gradient of the activation's output) the codes scale."""
    replaced: tuple[str, ...] = ()
    """Chain sites: the backward nodes that become one ``memfit::fewbit_grad`` (the last one's value)."""
    also_saved: tuple[str, ...] = ()
    """Chain sites: the other forward values the chain's backward read and no longer needs."""
    chain: str = ""
    """Chain sites: what wrote the chain (``NewGELUActivation``), or ``chain`` where not recorded."""

    def to_json(self) -> dict:
        chain = {"chain": self.chain, "also_saved": list(self.also_saved), "replaced": len(self.replaced)} if self.replaced else {}
        return {
            **chain,
            "backward": self.backward,
            "saved": self.saved,
            "kind": self.kind,
            "bits": self.bits,
            "saved_bytes": self.saved_bytes,
            "code_bytes": self.code_bytes,
            "rel_error": round(self.rel_error, 5),
            "module": self.module,
            "source": self.source,
        }


@dataclass(frozen=True)
class FewbitPlan:
    bits: int
    sites: tuple[FewbitSite, ...]
    skipped: tuple[tuple[str, str], ...]
    """(node, reason) for every derivative op left exact."""
    calibrated: bool = False
    table_source: str = "optimal"
    """``"optimal"`` or ``"approx_bp"`` (the ``fewbit_tables`` option; at 2 bits, GELU and SiLU)."""

    @property
    def bytes_saved(self) -> int:
        return sum(s.saved_bytes - s.code_bytes for s in self.sites)

    def to_json(self) -> dict:
        return {
            "bits": self.bits,
            "calibrated": self.calibrated,
            "table_source": self.table_source,
            "sites": [s.to_json() for s in self.sites],
            "skipped": [{"node": n, "reason": r} for n, r in self.skipped],
        }


@dataclass(frozen=True)
class Calibration:
    """Measured input histograms per activation kind (from ``memfit.calibrate_fewbit``)."""

    histograms: tuple[tuple[str, tables.Histogram], ...]

    def get(self, kind: str) -> tables.Histogram | None:
        base = "gelu" if kind == "gelu_tanh" else kind
        for k, h in self.histograms:
            if k == base:
                return h
        return None


def backward_nodes(joint: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Nodes of the joint graph that depend on a tangent (they run in the backward)."""
    from torch._functorch.partitioners import _is_tangent

    bw: set[torch.fx.Node] = set()
    for n in joint.graph.nodes:
        if (n.op == "placeholder" and _is_tangent(n)) or any(a in bw for a in n.all_input_nodes):
            bw.add(n)
    return bw


_ALIAS_OPS = (aten.detach.default, aten.alias.default)


def _aliases(value: torch.fx.Node) -> list[torch.fx.Node]:
    """The value's base (through detach/alias) first, then every detach/alias of it."""
    base = value
    while base.op == "call_function" and base.target in _ALIAS_OPS:
        base = base.args[0]
    group, stack = [], [base]
    while stack:
        v = stack.pop()
        group.append(v)
        stack.extend(u for u in v.users if u.op == "call_function" and u.target in _ALIAS_OPS)
    return group


def plan(joint: torch.fx.GraphModule, bits: int, calibration: Calibration | None = None,
         table_source: str = "optimal") -> FewbitPlan:
    """Every rewritable derivative op or activation chain of the joint graph, and why each other one
    is left exact."""
    from memfit.planner import fewbit_chains

    bw = backward_nodes(joint)
    sites, skipped = [], []
    chains = fewbit_chains.find(joint, bw, RULES)
    skipped.extend(chains.skipped)
    consumed: set[str] = set()
    by_name = {n.name: n for n in joint.graph.nodes}
    for match in chains.matches:
        got = _chain_site(match, by_name, bw, bits, calibration, table_source)
        if isinstance(got, str):
            skipped.append((match.grad_x, got))
            continue
        sites.append(got)
        consumed.update(match.component)
    for n in joint.graph.nodes:
        rule = RULES.get(n.target) if n.op == "call_function" else None
        if rule is None or n not in bw or n.name in consumed:
            continue
        saved = n.args[rule.saved_arg] if len(n.args) > rule.saved_arg else None
        if not isinstance(saved, torch.fx.Node) or saved in bw:
            skipped.append((n.name, "its saved argument is computed in the backward, not saved"))
            continue
        kind = rule.kind(n)
        if isinstance(kind, str):
            skipped.append((n.name, kind))
            continue
        kind, param = kind
        group = _aliases(saved)
        code_of = saved
        if rule.uses_output:
            saved = group[0]  # the op that made the value the backward reads through detach/alias
            if saved.target != rule.forward:
                skipped.append((n.name, f"its argument {saved.name} is not the output of {rule.forward} (so its input is unknown)"))
                continue
            code_of = saved.args[0]
        val = saved.meta.get("val")
        if not isinstance(val, torch.Tensor) or not val.is_floating_point():
            skipped.append((n.name, f"{saved.name} is not a floating-point tensor"))
            continue
        if unbacked(val):
            skipped.append((n.name, f"{saved.name}: {DATA_DEPENDENT}"))
            continue
        others = [u for a in group for u in a.users if u in bw and u is not n]
        if others:
            skipped.append(
                (
                    n.name,
                    f"{saved.name} is also used by {others[0].target} ({others[0].name}) in the backward, so it is saved "
                    "anyway; codes would add bytes",
                )
            )
            continue
        hist = calibration.get(kind) if calibration is not None else None
        t = tables.table(kind, bits, param=param, histogram=hist, source=table_source if bits == 2 else "optimal")
        module, source = source_of(saved)
        sites.append(
            FewbitSite(
                backward=n.name,
                saved=saved.name,
                code_of=code_of.name,
                kind=kind,
                param=param,
                bits=bits,
                boundaries=t.boundaries,
                levels=t.levels,
                saved_bytes=tensor_bytes(val),
                code_bytes=packed_numel(val.numel(), bits),
                rel_error=t.rel_error,
                module=module,
                source=source,
            )
        )
    order = {n.name: i for i, n in enumerate(joint.graph.nodes)}
    sites.sort(key=lambda s: order[s.backward])
    return FewbitPlan(bits=bits, sites=tuple(sites), skipped=tuple(skipped), calibrated=calibration is not None,
                      table_source=table_source)


def _chain_site(match, by_name, bw, bits, calibration, table_source="optimal") -> FewbitSite | str:
    """A chain's site: the forward values its backward alone read become one code of ``x``.

    The rewrite removes the backward component and, with it, the backward-only forward nodes that
    fed it (``3 * x**2``); a value the component read is no longer saved when nothing left in the
    backward reads it (the activation's output ``y`` usually stays: the next linear's weight
    gradient reads it)."""
    x = by_name[match.x]
    removed = {by_name[n] for n in match.component}
    # forward nodes that only the component (directly or through each other) read become dead
    changed = True
    while changed:
        changed = False
        for n in (by_name[m] for m in match.chain):
            if n not in removed and n.users and all(u in removed for u in n.users):
                removed.add(n)
                changed = True
    dropped, kept = [], []
    for name in match.reads:
        v = by_name[name]
        still = [u for u in v.users if u not in removed and (u in bw or _backward_only(u, bw))]
        (kept if still else dropped).append(v)
    if not dropped:
        return (
            f"{match.kind} chain {match.x} -> {match.y} not coded: every value its backward reads "
            f"({', '.join(match.reads)}) is read elsewhere in the backward too, so it is saved anyway; codes would add bytes"
        )
    val = x.meta["val"]
    hist = calibration.get(match.kind) if calibration is not None else None
    t = tables.table(match.kind, bits, histogram=hist, source=table_source if bits == 2 else "optimal")
    y = by_name[match.y]
    module, source = source_of(y)
    dropped.sort(key=lambda v: v is not x)  # x first: it is what the codes stand for
    return FewbitSite(
        backward=match.grad_x,
        saved=dropped[0].name,
        code_of=match.x,
        kind=match.kind,
        param=None,
        bits=bits,
        boundaries=t.boundaries,
        levels=t.levels,
        saved_bytes=sum(tensor_bytes(v.meta["val"]) for v in dropped),
        code_bytes=packed_numel(val.numel(), bits),
        rel_error=t.rel_error,
        module=module,
        source=source,
        grad=match.grad,
        replaced=match.component,
        also_saved=tuple(v.name for v in dropped[1:]),
        chain=match.activation or "chain",
    )


def _backward_only(n: torch.fx.Node, bw: set[torch.fx.Node]) -> bool:
    """A forward node whose value only the backward uses (directly or through such nodes)."""
    stack, seen = [n], set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        for u in v.users:
            if u.op == "output":
                return False
            if u not in bw:
                stack.append(u)
    return True
