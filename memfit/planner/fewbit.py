"""Few-bit plan: which activation derivatives get a packed code instead of a saved tensor.

A site is a backward derivative op (``gelu_backward(grad, x)``, ``sigmoid_backward(grad, y)``,
...) whose full-precision argument is saved for nothing else: replacing it by a ``bits``-bit code
of the activation's input removes the saved tensor and adds ``ceil(n / 8) * bits`` bytes (2 bits
of an fp32 tensor: 16x fewer bytes). Where that argument is also used by another backward op (a
ReLU output that the next linear layer needs for its weight gradient, say) it is saved anyway and
the codes would only add bytes: the site is skipped and the reason kept for the report.

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
    code_bytes: int
    rel_error: float
    """Relative L2 error of the input gradient under the table's weighting (normal or calibrated)."""
    module: str = ""
    source: str = ""

    def to_json(self) -> dict:
        return {
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

    @property
    def bytes_saved(self) -> int:
        return sum(s.saved_bytes - s.code_bytes for s in self.sites)

    def to_json(self) -> dict:
        return {
            "bits": self.bits,
            "calibrated": self.calibrated,
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


def plan(joint: torch.fx.GraphModule, bits: int, calibration: Calibration | None = None) -> FewbitPlan:
    """Every rewritable derivative op of the joint graph, and why each other one is left exact."""
    bw = backward_nodes(joint)
    sites, skipped = [], []
    for n in joint.graph.nodes:
        rule = RULES.get(n.target) if n.op == "call_function" else None
        if rule is None or n not in bw:
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
        t = tables.table(kind, bits, param=param, histogram=hist)
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
    return FewbitPlan(bits=bits, sites=tuple(sites), skipped=tuple(skipped), calibrated=calibration is not None)
