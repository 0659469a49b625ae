"""Memory-sharing norms: which LayerNorms and RMSNorms may compute their backward from their output.

A norm followed by a linear layer keeps two ``[tokens, hidden]`` tensors for the backward: its input
``x`` (for its own backward) and its output ``y`` (the linear's input, for the weight gradient). The
norm's backward needs ``x`` only through the normalised value ``x̂ = (x - mean) * rstd``, and
``x̂ = (y - β) / γ`` (``y / γ`` for an RMSNorm, ``y`` itself without an affine), so given the per-row
statistics it can read ``y`` instead (the memory-sharing backprop of Approx-BP/MS-BP, arXiv 2406.16282).
Under AOTAutograd's default partition (``inner="eager"``) that drops ``x``: for a 4-layer Llama that is
nine ``[tokens, hidden]`` tensors of the step's saved set. Inductor's min-cut keeps both here too (it
saves ``y`` for the linear's ``mm``, which it does not recompute into, and ``x`` or a cast of it for
the norm), so the rewrite helps there as well.

A site is one norm in the joint graph, in any of the forms AOTAutograd gives:

* ``native_layer_norm`` with its ``native_layer_norm_backward`` (no decomposition: ``inner="eager"``);
* a decomposed LayerNorm (``var_mean``, ``sub``, ``mul`` by ``rsqrt``, then ``* γ + β``: Inductor's);
* an RMSNorm written out (``pow(x, 2).mean(-1) + eps``, ``rsqrt``, ``x * rstd``, ``* γ``): HF's
  ``LlamaRMSNorm`` and its copies (Mistral, Qwen, T5's ``T5LayerNorm``, Gemma's ``1 + γ``) and
  ``nn.RMSNorm`` (which torch 2.13 decomposes the same way).

A norm is left as it is, with the reason, where sharing could be wrong or could not save anything:

* it computes in another precision than its output (an fp32 norm inside a bf16 model rounds ``y``:
  recovering ``x̂`` from it would round the gradient too): exact only where ``x`` and ``y`` share a
  float32/float64 dtype;
* ``γ`` holds a zero now (``x̂`` is lost where ``γ = 0``); a ``γ`` that reaches an exact zero later in
  training makes that norm's input gradient NaN, loudly, never a silently wrong value;
* nothing else in the backward reads ``y`` (the next op keeps a cast of it, say): reading ``y`` would
  add a tensor, not share one;
* the backward reads ``x`` for something other than the norm (then it stays saved anyway).

The plan only names nodes; :mod:`memfit.passes.share_norms` carries it out, and the backend keeps it
where the memory model predicts a lower peak.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx

from memfit.planner.cost import tensor_bytes
from memfit.planner.memory import source_of

aten = torch.ops.aten

_EXACT_DTYPES = (torch.float32, torch.float64)
_CASTS = (aten._to_copy.default, torch.ops.prims.convert_element_type.default)
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.t.default,
          aten.permute.default, aten.alias.default, aten.detach.default, aten.expand.default,
          aten.squeeze.dim, aten.unsqueeze.default, aten.transpose.int}


@dataclass(frozen=True)
class NormSite:
    """One norm whose backward is to read its output. Names are node names of the joint graph."""

    kind: str
    """``"layer_norm"`` (native op), ``"layer_norm_decomposed"`` or ``"rms_norm"``."""
    input: str
    """``x``: what stops being saved."""
    output: str
    """``y``: what the backward reads instead (already saved for another backward)."""
    xhat: str | None
    """``x̂`` (``None`` for the native op, which never names it)."""
    centered: str | None
    """``x - mean`` of a decomposed LayerNorm."""
    scaled: str | None
    """``x̂ * γ`` before ``+ β`` (LayerNorm with a bias)."""
    rstd: str
    mean: str | None
    weight: str | None
    bias: str | None
    backward_op: str | None
    """The ``native_layer_norm_backward`` node to replace (native form only)."""
    saved_bytes: int
    """Bytes of ``x``: what the default partition stops saving per site."""
    module: str = ""
    source: str = ""


@dataclass(frozen=True)
class SharePlan:
    """The norms to share, and the ones left as they are with the reason (for the report)."""

    sites: tuple[NormSite, ...]
    skipped: tuple[tuple[str, str], ...] = ()

    @property
    def saved_bytes(self) -> int:
        return sum(s.saved_bytes for s in self.sites)

    def to_json(self) -> dict:
        from dataclasses import asdict

        return {"sites": [asdict(s) for s in self.sites], "skipped": [list(s) for s in self.skipped]}


def _is(node: Any, *targets: Any) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def _val(node: Any):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _other(node: torch.fx.Node, one: Any) -> Any:
    """The other argument of a binary op one of whose arguments is ``one``."""
    a, b = node.args[:2]
    return b if a is one else a if b is one else None


def _last_dim_only(dims: Any, ndim: int) -> bool:
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    return len(dims) == 1 and dims[0] in (-1, ndim - 1)


def _affine(xhat: torch.fx.Node, hidden: int):
    """(y, scaled, weight, bias) after ``x̂``: ``x̂ * γ [+ β]`` (either operand order), or ``x̂`` alone."""

    def vec(a):
        v = _val(a)
        return isinstance(a, torch.fx.Node) and v is not None and v.dim() == 1 and v.shape[0] == hidden

    muls = [u for u in xhat.users if _is(u, aten.mul.Tensor) and vec(_other(u, xhat))]
    if len(muls) != 1:
        return xhat, None, None, None
    scaled = muls[0]
    weight = _other(scaled, xhat)
    adds = [u for u in scaled.users if _is(u, aten.add.Tensor) and vec(_other(u, scaled))]
    if len(adds) == 1 and len(scaled.users) == 1:
        return adds[0], scaled, weight, _other(adds[0], scaled)
    return scaled, None, weight, None


def _forward_needed(joint: torch.fx.GraphModule, num_fwd_outputs: int) -> set[torch.fx.Node]:
    """The nodes the forward's outputs need: everything else runs for the backward."""
    from memfit.planner.graphs import ancestors

    out = next(n for n in reversed(joint.graph.nodes) if n.op == "output")
    flat = out.args[0] if isinstance(out.args[0], (list, tuple)) else [out.args[0]]
    return ancestors(flat[:num_fwd_outputs])


def _find(joint: torch.fx.GraphModule) -> list[dict]:
    """Every norm of the recognised forms, as a dict of its nodes."""
    found = []
    for n in joint.graph.nodes:
        if _is(n, aten.native_layer_norm.default):
            x, shape = n.args[0], n.args[1]
            outs = {u.args[1]: u for u in n.users if u.target is operator.getitem}
            if 0 not in outs or 2 not in outs or 1 not in outs:
                continue
            bwd = [u for u in x.users if _is(u, aten.native_layer_norm_backward.default)
                   and u.args[3] is outs[1] and u.args[4] is outs[2]]
            found.append(dict(kind="layer_norm", node=n, x=x, y=outs[0], mean=outs[1], rstd=outs[2],
                              weight=n.args[2] if len(n.args) > 2 else None, bias=n.args[3] if len(n.args) > 3 else None,
                              xhat=None, centered=None, scaled=None, backward_op=bwd[0] if len(bwd) == 1 else None,
                              shape=shape, nbwd=len(bwd)))
        elif _is(n, aten.rsqrt.default):
            add = n.args[0]
            if not _is(add, aten.add.Tensor, aten.add.Scalar) or isinstance(add.args[1], torch.fx.Node):
                continue
            stat = add.args[0]
            site = None
            if _is(stat, operator.getitem) and stat.args[1] == 0 and _is(stat.args[0], aten.var_mean.correction):
                vm = stat.args[0]
                x = vm.args[0]
                xv = _val(x)
                if (xv is None or vm.kwargs.get("correction", 1) != 0 or not vm.kwargs.get("keepdim", False)
                        or not _last_dim_only(vm.args[1], xv.dim())):
                    continue
                mean = next((u for u in vm.users if u.target is operator.getitem and u.args[1] == 1), None)
                subs = [u for u in x.users if _is(u, aten.sub.Tensor) and u.args[0] is x and u.args[1] is mean]
                xhats = [u for s in subs for u in s.users if _is(u, aten.mul.Tensor) and _other(u, s) is n]
                if mean is None or not xhats:
                    continue
                site = dict(kind="layer_norm_decomposed", x=x, mean=mean, centered=xhats[0].args[0] if xhats[0].args[0] is not n else xhats[0].args[1],
                            xhat=xhats[0], rstd=n)
            elif _is(stat, aten.mean.dim) and _is(stat.args[0], aten.pow.Tensor_Scalar) and stat.args[0].args[1] == 2:
                x = stat.args[0].args[0]
                xv = _val(x)
                keepdim = stat.args[2] if len(stat.args) > 2 else stat.kwargs.get("keepdim", False)
                if xv is None or not keepdim or not _last_dim_only(stat.args[1], xv.dim()):
                    continue
                xhats = [u for u in x.users if _is(u, aten.mul.Tensor) and _other(u, x) is n]
                if not xhats:
                    continue
                site = dict(kind="rms_norm", x=x, mean=None, centered=None, xhat=xhats[0], rstd=n)
            if site is None:
                continue
            hidden = _val(site["x"]).shape[-1]
            y, scaled, weight, bias = _affine(site["xhat"], hidden)
            site.update(y=y, scaled=scaled, weight=weight, bias=bias, backward_op=None, node=site["xhat"])
            found.append(site)
    return found


def _view_closure(y: torch.fx.Node) -> set[torch.fx.Node]:
    out, stack = set(), [y]
    while stack:
        v = stack.pop()
        if v in out:
            continue
        out.add(v)
        stack.extend(u for u in v.users if _is(u, *_VIEWS))
    return out


def plan(joint: torch.fx.GraphModule, num_fwd_outputs: int, values: Sequence[Any] | None = None) -> SharePlan:
    """The norms of ``joint`` whose backward can read their output instead of their input.

    ``values`` are the joint graph's primal inputs as real tensors where known (the backend's example
    inputs), to check ``γ`` for zeros; fake or missing values (``memfit analyze`` on fake tensors, a ``γ``
    computed in the graph such as Gemma's ``1 + w``) cannot be checked, and are taken as nonzero."""
    from torch._functorch.partitioners import _is_primal

    fwd = _forward_needed(joint, num_fwd_outputs)
    order = {n: i for i, n in enumerate(joint.graph.nodes)}
    primals = [n for n in joint.graph.nodes if n.op == "placeholder" and _is_primal(n)]
    real = {}
    if values is not None and len(values) == len(primals):
        from torch._subclasses.fake_tensor import is_fake

        real = {p: v for p, v in zip(primals, values) if isinstance(v, torch.Tensor) and not is_fake(v)}
    sites, skipped = [], []
    for s in _find(joint):
        x, y, where = s["x"], s["y"], s["node"].name
        module, source = source_of(s["node"])
        label = f"{s['kind']} at {source or module or where}"
        xv, yv = _val(x), _val(y)
        cast = next((u for u in y.users if _is(u, *_CASTS)), None) if y is s["xhat"] else None
        if cast is not None:  # x̂ rounded to the model's dtype before γ (HF's RMSNorm in a bf16 model)
            yv = _val(cast)
        if xv is None or yv is None or xv.dtype != yv.dtype or xv.dtype not in _EXACT_DTYPES:
            skipped.append((where, f"{label}: computes in {getattr(xv, 'dtype', '?')} with output in "
                                   f"{getattr(yv, 'dtype', '?')}; recovering its input from the output is exact only "
                                   "in float32/float64"))
            continue
        if s["kind"] == "layer_norm" and (s["backward_op"] is None or len(s["shape"]) != 1):
            why = ("it normalises over more than the last dimension" if len(s["shape"]) != 1
                   else "its backward is not one native_layer_norm_backward" if s["nbwd"] != 1 else "no backward")
            skipped.append((where, f"{label}: {why}"))
            continue
        w = s["weight"]
        if w is not None and w in real and _has_zero(real[w]):
            skipped.append((where, f"{label}: γ ({w.name}) holds zeros, where its input cannot be recovered "
                                   "from its output"))
            continue
        # the backward side: nodes the forward's outputs do not need
        readers = {u for v in (x, s["centered"], s["xhat"], s["scaled"]) if v is not None
                   for u in v.users if u not in fwd}
        own = {s["backward_op"]} if s["backward_op"] is not None else set()
        reads_y = any(u not in fwd for v in _view_closure(y) for u in v.users)
        early = [u for u in readers if order[u] < order[y]]
        if not readers:
            skipped.append((where, f"{label}: the backward does not read its input (the partition recomputes the norm)"))
            continue
        if early:
            skipped.append((where, f"{label}: its input is also read for another backward ({early[0].name}), so it "
                                   "stays saved"))
            continue
        if not reads_y:
            skipped.append((where, f"{label}: nothing else in the backward reads its output, so reading it would "
                                   "add a saved tensor rather than share one"))
            continue
        if s["kind"] != "rms_norm":
            # a LayerNorm's input is recovered only through x̂; any other backward use of x would round
            # (x = x̂ / rstd + mean cancels), so it must be the norm's own backward or its recomputation
            others = [u for u in x.users if u not in fwd and u not in own and u is not s["centered"]
                      and not is_centering(u, x, s["mean"])]
            if others:
                skipped.append((where, f"{label}: the backward also reads its input in {others[0].name}, so it stays saved"))
                continue
        sites.append(NormSite(
            s["kind"], x.name, y.name, getattr(s["xhat"], "name", None), getattr(s["centered"], "name", None),
            getattr(s["scaled"], "name", None), s["rstd"].name, getattr(s["mean"], "name", None),
            getattr(w, "name", None), getattr(s["bias"], "name", None), getattr(s["backward_op"], "name", None),
            tensor_bytes(xv), module, source,
        ))
    return SharePlan(tuple(sites), tuple(skipped))


def _has_zero(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.no_grad():  # partitioning runs under the fake mode
        return bool((t == 0).any())


def is_centering(node: torch.fx.Node, x: torch.fx.Node, mean: torch.fx.Node | None) -> bool:
    """Whether ``node`` computes ``x - mean`` (a decomposed LayerNorm's backward recomputes it from ``x``);
    the planner allows that read of ``x``, and the pass replaces it by the recovered ``x - mean``."""
    return (mean is not None and node.op == "call_function" and node.target is aten.sub.Tensor
            and node.args[0] is x and node.args[1] is mean)


__all__ = ["NormSite", "SharePlan", "is_centering", "plan"]
