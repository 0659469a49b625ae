"""Few-bit sites in activations written as chains of pointwise ops (Hugging Face's ``ACT2FN``).

``gelu_new`` (GPT-2, Phi), ``gelu_fast``, ``gelu_python`` and ``quick_gelu`` (CLIP) are written in
Python as several tensor ops, so the joint graph has no ``gelu_backward`` to match: GPT-2's
``0.5 * x * (1 + tanh(c * (x + 0.044715 * x**3))))`` becomes 8 forward ops and, in the backward,
8 ops around a ``tanh_backward`` that read four forward tensors (``x``, ``0.5 * x``, ``tanh``,
``1 + tanh``: under AOTAutograd's default partition all four are saved, 4 bytes each per element
in fp32). The single-op rules would code only the inner ``tanh`` (18.2% gradient error at 2 bits,
and ``x`` stays saved); coding the whole chain saves all four for 2 bits per element, at the
13.3% of the tanh-GELU table.

How a chain is found, on the joint graph (the same under ``inner="eager"`` and under Inductor's
decompositions, which leave these ops as they are):

1. **Forward chain** ``C(x)``: from a floating forward value ``x``, every forward node that is
   pointwise (or an alias/dtype cast) and reads only ``x``, other nodes of the chain and scalars,
   with ``x``'s shape. It is an activation when every forward use of ``x`` is in it, exactly one of
   its nodes (``y``) feeds the rest of the forward, and at least two of the ops computing ``y`` are
   nonlinear-capable (``x * 0.5`` alone is a scale, not an activation).
2. **Backward component**: the backward pointwise nodes that read the chain, closed under their
   pointwise users whose inputs are all in the chain, the component, or backward values; split into
   connected components. The one that is ``x``'s gradient reads exactly one backward value ``g``
   (the gradient of ``y``) and has exactly one value used outside it (``grad_x``).
3. **Proof by probe**: the component is evaluated in float64 on 3,000+ values of ``x`` (a 0.01
   grid on [-8, 8], 1,500 normal samples, and 12 points out to +-1e4, where a clamp would show) and random
   ``g``, and must equal ``g * f'(x)`` for a table's ``f`` to within 1e-6 relative (measured: 5e-15 for
   ``gelu_new``, 2e-16 for ``gelu_python``, 1e-12 for ``gelu_fast``, whose 0.7978845608 is sqrt(2/pi)
   to 4e-12). Only chains
   of analytic ops (no comparisons, clamps, ``relu``) are accepted: two analytic functions equal on
   an interval are equal everywhere, so the probe cannot miss a region where they differ.

A chain that looks like an activation but cannot be matched is reported with the reason and left
to the single-op rules (its ``tanh_backward`` or ``sigmoid_backward`` may still be coded alone).
``relu2`` (``relu(x)**2``) is recognised and declined: its derivative ``2 relu(x)`` is unbounded,
so a table caps it at its top level (2 bits: 20.8% error on normal inputs, and the gradient at
``x = 6`` is 4.1 instead of 12); see ``docs/fewbit.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx

from memfit.kernels import fewbit_tables as tables
from memfit.planner.graphs import connected_groups
from memfit.planner.shapes import DATA_DEPENDENT, unbacked

aten = torch.ops.aten
prims = torch.ops.prims

#: Kinds a chain is tried against (parameter-free tables), in this order.
CHAIN_KINDS = ("gelu_tanh", "gelu", "quick_gelu", "silu", "sigmoid", "tanh", "mish")

#: Derivatives recognised and declined, with why (never coded).
DECLINED = {
    "relu_squared": (
        lambda x: 2.0 * np.maximum(x, 0.0),
        ("relu(x)**2 (relu2): its derivative 2*relu(x) is unbounded, so a few-bit table caps it at its top "
         "level (2 bits: 20.8% gradient error on normal inputs, and 4.1 instead of 12 at x = 6); left exact"),
    ),
}

#: Largest relative deviation of the chain's gradient from ``g * f'(x)`` that counts as a match.
MATCH_TOLERANCE = 1e-6

_ALIASES = (aten.detach.default, aten.alias.default, aten.clone.default)
_CASTS = (prims.convert_element_type.default, aten._to_copy.default)

#: Pointwise ops that are analytic in their tensor inputs (pow: with an integer exponent).
_ANALYTIC = frozenset({
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar, aten.rsub.Tensor,
    aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.neg.default,
    aten.reciprocal.default, aten.square.default, aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor,
    aten.exp.default, aten.expm1.default, aten.tanh.default, aten.sigmoid.default, aten.erf.default,
    aten.erfc.default, aten.sin.default, aten.cos.default,
    aten.gelu.default, aten.silu.default, aten.mish.default,
    aten.tanh_backward.default, aten.sigmoid_backward.default, aten.gelu_backward.default,
    aten.silu_backward.default, aten.mish_backward.default,
    *_ALIASES, *_CASTS,
})
#: Ops whose presence among an input's users marks it as an activation's input (for the notes).
_SQUASHING = frozenset({aten.tanh.default, aten.sigmoid.default, aten.erf.default, aten.exp.default})
#: Ops activations are written with: a chain of only these that cannot be matched is reported; a
#: chain with anything else (a norm's ``rsqrt(mean + eps)``) is not an activation and is passed over.
_ACTIVATION_OPS = _ANALYTIC | frozenset({
    aten.relu.default, aten.threshold_backward.default, aten.clamp.default, aten.clamp_min.default,
    aten.clamp_max.default, aten.hardtanh.default, aten.where.self, aten.maximum.default, aten.minimum.default,
    aten.abs.default, aten.sign.default, aten.leaky_relu.default, aten.elu.default, aten.softplus.default,
    aten.hardswish.default, aten.hardsigmoid.default,
})
#: Ops that are linear in the one chain value they read (with scalars): not an activation alone.
_LINEAR = frozenset({
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar, aten.rsub.Tensor,
    aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.neg.default, *_ALIASES, *_CASTS,
})


@dataclass(frozen=True)
class ChainMatch:
    """One activation chain whose backward was proven to compute ``grad * f'(x)`` for a table's ``f``."""

    x: str
    """The activation's input (its code is packed)."""
    y: str
    """The chain's output (the activation's value, left as the model computes it)."""
    grad: str
    """The backward value the component multiplies: the gradient of ``y``."""
    grad_x: str
    """The component's output: ``x``'s gradient, to become ``memfit::fewbit_grad``."""
    component: tuple[str, ...]
    """The backward nodes the rewrite removes (graph order)."""
    chain: tuple[str, ...]
    """The forward chain's nodes, ``x`` excluded (those only the component read die with it)."""
    reads: tuple[str, ...]
    """Forward values of the chain a partition saves for the component (``x``, ``tanh``, ...)."""
    kind: str
    deviation: float
    """Largest relative deviation from ``grad * f'(x)`` on the probes."""
    activation: str = ""
    """The module class that wrote the chain, where the graph recorded it (``NewGELUActivation``)."""


@dataclass(frozen=True)
class Chains:
    matches: tuple[ChainMatch, ...]
    skipped: tuple[tuple[str, str], ...]
    """(node, reason) for each activation-like chain left to the single-op rules."""


def _is_pointwise(n: torch.fx.Node) -> bool:
    if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
        return False
    if n.target in _ALIASES or n.target is prims.convert_element_type.default:
        return True
    if n.target is aten._to_copy.default:  # a dtype cast only
        return set(n.kwargs) <= {"dtype"} and len(n.args) == 1
    return torch.Tag.pointwise in n.target.tags


def _tensor_inputs(n: torch.fx.Node) -> list[torch.fx.Node]:
    return list(n.all_input_nodes)


def _same_shape(n: torch.fx.Node, shape) -> bool:
    v = n.meta.get("val")
    return isinstance(v, torch.Tensor) and tuple(v.shape) == shape and v.is_floating_point()


def _op_name(n: torch.fx.Node) -> str:
    return str(getattr(n.target, "__name__", n.target)).split(".")[0]


def _analytic(n: torch.fx.Node) -> bool:
    if n.target not in _ANALYTIC:
        return False
    if n.target is aten.pow.Tensor_Scalar:
        return float(n.args[1]).is_integer()
    return n.target is not aten.pow.Tensor_Tensor


def _forward_needed(graph: torch.fx.Graph, bw: set[torch.fx.Node]) -> set[torch.fx.Node]:
    """Forward nodes the forward's own outputs need (not only the backward)."""
    needed: set[torch.fx.Node] = set()
    for n in reversed(graph.nodes):
        if n in bw or n.op == "output":
            continue
        if any(u.op == "output" or (u not in bw and u in needed) for u in n.users):
            needed.add(n)
    return needed


def _chain(x: torch.fx.Node, bw: set[torch.fx.Node], order: dict) -> list[torch.fx.Node]:
    """Forward pointwise nodes computed from ``x`` alone, with its shape (graph order)."""
    shape = tuple(x.meta["val"].shape)
    members, stack = {x}, [x]
    while stack:
        for u in stack.pop().users:
            if u in members or u in bw or not _is_pointwise(u) or not _same_shape(u, shape):
                continue
            if all(a in members for a in u.all_input_nodes):  # else revisited when its other input joins
                members.add(u)
                stack.append(u)
    members.discard(x)
    return sorted(members, key=order.__getitem__)


def _activation_name(n: torch.fx.Node) -> str:
    stack = n.meta.get("nn_module_stack")
    if stack:
        cls = list(stack.values())[-1][1]
        return getattr(cls, "__name__", str(cls).rsplit(".", 1)[-1].strip("'>"))
    return ""


# -- probes ----------------------------------------------------------------------------------------
def _probes() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(20261201)
    far = np.array([10.0, 20.0, 50.0, 100.0, 1e3, 1e4])
    x = np.concatenate([np.linspace(-8.0, 8.0, 1601), rng.normal(0.0, 3.0, 1500), far, -far])
    g = rng.normal(0.0, 1.0, x.shape) * np.exp(rng.uniform(-2.0, 2.0, x.shape))
    return x, g


_X, _G = _probes()


def _evaluate(nodes: list[torch.fx.Node], x: torch.fx.Node, g: torch.fx.Node, out: torch.fx.Node) -> np.ndarray:
    """``out`` as a function of ``x`` and ``g`` in float64 on the probes (casts kept at float64)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    with unset_fake_temporarily(), disable_proxy_modes_tracing(), torch.no_grad():
        env = {x: torch.from_numpy(_X), g: torch.from_numpy(_G)}

        def get(a):
            if isinstance(a, torch.fx.Node):
                return env[a]
            if isinstance(a, (list, tuple)):
                return type(a)(get(b) for b in a)
            return a

        for n in nodes:
            if n in env:
                continue
            if n.target in _ALIASES or n.target in _CASTS:
                env[n] = env[n.args[0]]
                continue
            env[n] = n.target(*get(n.args), **get(dict(n.kwargs)))
        return env[out].double().numpy()


def _deviation(value: np.ndarray, expected: np.ndarray) -> float:
    if not (np.all(np.isfinite(value)) and np.all(np.isfinite(expected))):
        return float("inf")
    return float(np.max(np.abs(value - expected) / (np.abs(_G) * (1.0 + np.abs(expected / _G)))))


# -- matching --------------------------------------------------------------------------------------
def find(joint: torch.fx.GraphModule, bw: set[torch.fx.Node], rule_targets) -> Chains:
    """Every activation chain of ``joint`` whose backward is proven ``grad * f'(x)``, and the reasons
    for the activation-like chains that are not. Chains of one op (``aten.gelu`` and its
    ``gelu_backward``) are left to the single-op rules, as before."""
    graph = joint.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    needed = _forward_needed(graph, bw)
    claimed: set[torch.fx.Node] = set()
    matches, skipped = [], []
    for x in graph.nodes:
        if x in bw or x in claimed or x.op == "output":
            continue
        val = x.meta.get("val")
        if not isinstance(val, torch.Tensor) or not val.is_floating_point():
            continue
        if unbacked(val):  # numel() == 0 on it raised GuardOnDataDependentSymNode (a crash, not a decline)
            if any(u.target in _SQUASHING for u in x.users):  # an activation's input: say why it stays exact
                skipped.append((x.name, DATA_DEPENDENT))
            continue
        if val.numel() == 0:
            continue
        chain = _chain(x, bw, order)
        if not chain:
            continue
        members = set(chain)
        fwd = [n for n in chain if n in needed]
        compute = [n for n in fwd if n.target not in _ALIASES and n.target not in _CASTS]
        if len(compute) < 2 or all(_linear(n, members | {x}) for n in compute):
            continue  # one op (the single-op rules' case) or a scale: not an activation chain
        if any(u in needed and u not in members for u in x.users):
            continue  # x feeds more than this chain (a norm's x * rsqrt(...)): not an activation
        if not all(n.target in _ACTIVATION_OPS for n in compute):
            continue  # a norm's rsqrt(mean + eps) and the like: not an activation
        if not any(u in bw for v in (x, *chain) for u in v.users):
            continue  # no gradient flows through it (rotary tables)
        claimed |= members
        outs = [n for n in fwd if any(u.op == "output" or (u in needed and u not in members) for u in n.users)]
        if len(outs) != 1:
            skipped.append((x.name, f"the pointwise chain from {x.name} has {len(outs)} forward outputs, not one activation value"))
            continue
        y = outs[0]
        got = _match(x, y, members, bw, needed, rule_targets, order)
        if isinstance(got, ChainMatch):
            matches.append(got)
        elif got is not None:
            skipped.append((y.name, got))
    return Chains(tuple(matches), tuple(skipped))


def _linear(n: torch.fx.Node, chain: set[torch.fx.Node]) -> bool:
    """Affine in the chain's values: sums, scalings, casts (``0.5 * x + x`` is not an activation)."""
    reads = [a for a in n.all_input_nodes if a in chain]
    if n.target in _ALIASES or n.target in _CASTS or n.target in (aten.add.Tensor, aten.sub.Tensor, aten.rsub.Tensor):
        return True
    if n.target is aten.div.Tensor:
        return not (isinstance(n.args[1], torch.fx.Node) and n.args[1] in chain)
    return n.target in _LINEAR and len(reads) <= 1


def _components(x, members, bw, shape, order, foreign: set[str]) -> list[set[torch.fx.Node]]:
    """Backward pointwise nodes that read the chain, closed under their users, as connected components.

    A node joins when its tensor inputs are chain values, component nodes or backward values, and it
    brings in a new backward value only together with a chain value: so ``grad_y * tanh`` joins,
    and the residual stream's ``grad_x + other_grad`` past the activation does not. Forward values
    outside the chain that a node reading the chain also reads are added to ``foreign``."""
    inside = members | {x}
    comp: set[torch.fx.Node] = set()

    def admissible(n):
        if n not in bw or not _is_pointwise(n) or not _same_shape(n, shape):
            return False
        ins = n.all_input_nodes
        if not all(a in inside or a in bw for a in ins):
            if any(a in inside or a in comp for a in ins):  # a clamp's mask, say: the chain's gradient needs it
                foreign.update(a.name for a in ins if a not in inside and a not in bw)
            return False  # reads another forward value (``up`` of a gated MLP)
        return any(a in inside for a in ins) or all(a in comp or a in inside for a in ins)

    frontier = [u for v in inside for u in v.users if u in bw]
    while frontier:
        n = frontier.pop()
        if n in comp or not admissible(n):
            continue  # a rejected node is looked at again when another of its inputs joins
        comp.add(n)
        frontier.extend(n.users)
    groups = connected_groups(sorted(comp, key=order.get), lambda n: n.all_input_nodes, lambda a, n: True)
    return [set(g) for g in groups]


def _match(x, y, members, bw, needed, rule_targets, order) -> ChainMatch | str | None:
    shape = tuple(x.meta["val"].shape)
    inside = members | {x}
    reasons, foreign = [], set()
    for comp in _components(x, members, bw, shape, order, foreign):
        compute = [n for n in comp if n.target not in _ALIASES]
        if len(compute) == 1 and compute[0].target in rule_targets:
            return None  # a single derivative op: the single-op rules' site, as before
        grads = {a for n in comp for a in n.all_input_nodes if a in bw and a not in comp}
        outs = [n for n in comp if any(u not in comp for u in n.users)]
        if len(grads) != 1 or len(outs) != 1:
            reasons.append(f"its backward reads {len(grads)} gradient(s) and gives {len(outs)} value(s), not one of each")
            continue
        (g,), (out,) = grads, outs
        if not _same_shape(g, shape) or g.meta["val"].dtype != out.meta["val"].dtype:
            reasons.append(f"the gradient it multiplies ({g.name}) does not have the shape and dtype of {x.name}'s")
            continue
        nodes = _ancestors(out, comp | inside, order)
        try:
            value = _evaluate(nodes, x, g, out)
        except Exception as e:  # noqa: BLE001  (an op the probe cannot run on float64 CPU tensors)
            reasons.append(f"its backward could not be evaluated on probes ({type(e).__name__}: {e})")
            continue
        devs = {k: _deviation(value, _G * tables.derivative(k, _X)) for k in CHAIN_KINDS}
        kind = min(devs, key=devs.get)
        if devs[kind] > MATCH_TOLERANCE:
            for fp, why in DECLINED.values():
                if _deviation(value, _G * fp(_X)) <= MATCH_TOLERANCE:
                    return why
            reasons.append(
                f"its backward computes grad * f'(x) for no table (tried {', '.join(CHAIN_KINDS)}; closest {kind}, "
                f"{devs[kind]:.2g} relative deviation)"
            )
            continue
        bad = [n for n in nodes if n is not x and n is not g and not _analytic(n)]
        if bad:
            reasons.append(
                f"it matches {kind} on the probes but uses {_op_name(bad[0])}, which is not analytic, so the probes "
                "cannot prove it everywhere"
            )
            continue
        return ChainMatch(
            x=x.name,
            y=y.name,
            grad=g.name,
            grad_x=out.name,
            component=tuple(n.name for n in sorted(comp, key=order.__getitem__)),
            chain=tuple(n.name for n in sorted(members, key=order.__getitem__)),
            reads=tuple(n.name for n in sorted(_saved_reads(comp, inside, needed, x), key=order.__getitem__)),
            kind=kind,
            deviation=devs[kind],
            activation=_activation_name(y),
        )
    if not reasons:
        return None  # no backward reads the chain (no gradient flows through it)
    if foreign:
        reasons.insert(0, f"its backward also reads {', '.join(sorted(foreign))}, forward values from outside the chain "
                          "(a clamp's or a mask's)")
    return f"activation chain {x.name} -> {y.name} not coded as a whole: " + "; ".join(dict.fromkeys(reasons))


def _ancestors(out: torch.fx.Node, allowed: set[torch.fx.Node], order: dict) -> list[torch.fx.Node]:
    seen, stack = set(), [out]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(a for a in n.all_input_nodes if a in allowed)
    return sorted(seen, key=order.__getitem__)


def _saved_reads(comp, inside, needed, x) -> set[torch.fx.Node]:
    """The forward values of the chain a partition would save for ``comp``: what it reads, through
    backward-only chain nodes (``3 * x**2``) to the values the forward makes anyway."""
    out, stack, seen = set(), [a for n in comp for a in n.all_input_nodes if a in inside], set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if v is x or v in needed:
            out.add(v)
        else:
            stack.extend(a for a in v.all_input_nodes if a in inside)
    return out
