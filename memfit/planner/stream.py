"""Find token-wise regions of a forward graph and plan streaming them in chunks along the sequence.

A value is *token-laid-out* when one of its dims holds the sequence: dim ``k`` of size ``P*T*Q``
where the token index is the middle factor (``[B, T, d]`` has ``k=1, P=Q=1``; the ``[B*T, d]`` that a
linear layer sees has ``k=0, P=B``). An op is *row-local* when every output row (token) depends only
on the same row of its token-laid-out inputs, the other inputs (weights, biases, size-1 broadcasts)
being shared by all rows: pointwise ops, ``mm`` over non-token dims, layer/RMS norm over the hidden
dim, softmax over the vocabulary, embedding lookups, views that keep the token dim identifiable. A
connected set of row-local ops is a *region*: computing it on rows ``[s, e)`` of its token inputs
gives rows ``[s, e)`` of its token outputs, exactly, so it can run chunk by chunk — in the forward,
in the recomputation and in the backward — and its intermediates never exist for the whole sequence.

Reductions over the tokens (the loss's mean, a ``sum``) end a region: each chunk adds its partial sum,
and a mean divides by a normaliser the graph computes (for ``nll_loss`` the count of non-ignored
targets, which the op itself returns), so there is no host synchronisation.

The rules are per op (the methods of ``_Rules``, which ``_rule_for`` picks for a node) and
conservative: an op with no rule, a view that merges the token dim with another one, a random op
(dropout's mask cannot be drawn in chunks the way it is drawn whole) ends the region, and the op and
the reason are recorded for the report. That is the whole correctness argument: a region only holds
ops whose rows are independent — and attentions, which mix tokens only through their keys and values:
those come whole from an earlier region, and each query chunk reads them (its prefix of them when the
attention is provably causal, see :func:`_attention_mode`) with its own rows of the mask.

Like StreamBP (arXiv 2506.03077) the forward keeps only a region's inputs; unlike it, the regions come
from the graph, not from monkeypatched modules, and the loss's normaliser comes from the graph with no
``.item()``.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx

from memfit.planner.graphs import connected_groups

aten = torch.ops.aten


@dataclass(frozen=True)
class Tok:
    """Where a value holds the tokens: dim ``dim`` has size ``outer * T * inner``, token in the middle."""

    dim: int
    outer: int = 1
    inner: int = 1
    prefix: bool = False
    """A causal attention's keys or values: chunk ``[s, e)`` reads rows ``[0, e)`` (and its gradient
    there is accumulated over the chunks)."""
    whole: bool = False
    """A non-causal attention's keys or values (or those of one whose explicit mask is not provably
    causal): every chunk reads all rows, and their gradient is accumulated over the chunks."""

    def span(self, seq: int, start: int, end: int) -> tuple[int, int]:
        """The rows chunk ``[start, end)`` reads."""
        return (0, seq) if self.whole else (0, end) if self.prefix else (start, end)

    @property
    def shared_rows(self) -> bool:
        """Read by more than one chunk (keys and values): the gradient is added up, not written."""
        return self.prefix or self.whole

    def chunk_shape(self, shape, seq: int, c: int) -> list[int]:
        s = list(shape)
        s[self.dim] = self.outer * c * self.inner
        return s

    def rows(self, x: torch.Tensor, seq: int, start: int, end: int) -> torch.Tensor:
        """The rows ``[start, end)`` of ``x`` (a view)."""
        shape = list(x.shape)
        split = shape[: self.dim] + [self.outer, seq, self.inner] + shape[self.dim + 1 :]
        v = x.view(split).narrow(self.dim + 1, start, end - start)
        out = shape[: self.dim] + [self.outer * (end - start) * self.inner] + shape[self.dim + 1 :]
        return v.reshape(out) if self.outer != 1 or self.inner != 1 else v.view(out)

    def write(self, full: torch.Tensor, seq: int, start: int, end: int, value: torch.Tensor) -> None:
        """``full``'s rows ``[start, end)`` = ``value`` (in place, through the split view)."""
        shape = list(full.shape)
        split = shape[: self.dim] + [self.outer, seq, self.inner] + shape[self.dim + 1 :]
        dst = full.view(split).narrow(self.dim + 1, start, end - start)
        dst.copy_(value.reshape(dst.shape))


#: reduction kinds a region may end with (each chunk adds a partial sum)
SUM, MEAN, NLL = "sum", "mean", "nll"


@dataclass(frozen=True)
class RegionPlan:
    """One region to stream: its nodes (by name, in graph order), inputs, outputs and chunk count."""

    name: str
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    input_layouts: tuple[Tok | None, ...]
    """``None``: shared by every chunk (a weight); else how the input is sliced."""
    outputs: tuple[str, ...]
    output_layouts: tuple[Tok | str | None, ...]
    """A :class:`Tok` (assembled from chunks), a reduction kind (``sum``/``mean``/``nll``) or ``None``."""
    chunks: int
    grad_in_forward: bool
    """The region's only differentiable output is a reduction (the loss): each chunk's backward runs
    in the forward, right after it, and the backward only scales the gradients — no recompute."""
    region_bytes: int = 0
    """Bytes of the region's intermediates for the whole sequence (what streaming avoids holding)."""
    fused: bool = False
    """Run the chunk graphs compiled by Inductor (with ``inner="inductor"``, for a region whose chunks
    share one or two graphs: a prefix attention has one per prefix length, each a compile of its own)."""
    attentions: tuple[tuple[str, str], ...] = ()
    """(attention node, ``"prefix"`` | ``"whole"``): the attentions run by query chunks, and which keys
    a chunk reads (see :func:`_attention_mode`)."""


@dataclass(frozen=True)
class StreamPlan:
    seq_len: int
    regions: tuple[RegionPlan, ...]
    notes: tuple[str, ...] = ()


@dataclass
class _Info:
    layout: dict = field(default_factory=dict)  # node -> Tok | None | tuple of them
    member: dict = field(default_factory=dict)  # node -> reduction kind or "row"
    reason: dict = field(default_factory=dict)  # node -> why it is not row-local (it had token inputs)
    inferred: dict = field(default_factory=dict)  # (node, arg node) -> Tok inferred for an external arg
    attn: dict = field(default_factory=dict)  # member attention -> "prefix" | "whole" (which keys a chunk reads)


class _Stop(Exception):
    pass


def _val(n):
    return n.meta.get("val") if isinstance(n, torch.fx.Node) else None


def _shape(n) -> tuple[int, ...]:
    v = _val(n)
    return tuple(int(s) for s in v.shape)


def _norm(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


class _Rules:
    """The per-op layout rules: each returns the output layout(s) or raises ``_Stop(reason)``."""

    def __init__(self, info: _Info, seq: int):
        self.info = info
        self.seq = seq

    def lay(self, a):
        if not isinstance(a, torch.fx.Node):
            return None
        return self.info.layout.get(a)

    # -- generic ------------------------------------------------------------------------------
    def pointwise(self, n):
        out = _val(n)
        if not isinstance(out, torch.Tensor):
            raise _Stop("pointwise op without a tensor output")
        nd = out.dim()
        found = None
        tensor_args = [a for a in _flat(n.args, n.kwargs) if isinstance(a, torch.fx.Node) and isinstance(_val(a), torch.Tensor)]
        for a in tensor_args:
            t = self.lay(a)
            if isinstance(t, Tok):
                pos = nd - _val(a).dim() + t.dim
                key = (pos, t.outer, t.inner)
                if found is not None and found != key:
                    raise _Stop("operands hold the tokens in different dims")
                found = key
        if found is None:
            return None
        pos, outer, inner = found
        for a in tensor_args:
            if isinstance(self.lay(a), Tok):
                continue
            s = _shape(a)
            apos = pos - (nd - len(s))
            if apos < 0 or s[apos] == 1:
                continue  # broadcast: shared by all rows
            if s[apos] != out.shape[pos]:
                raise _Stop("an operand's token dim does not match")
            self.info.inferred[(n, a)] = Tok(apos, outer, inner)
        return Tok(pos, outer, inner)

    def same(self, n):
        return self.lay(n.args[0])

    def view(self, n):
        t = self.lay(n.args[0])
        src, dst = _shape(n.args[0]), _shape(n)
        r = t.inner * math.prod(src[t.dim + 1 :])
        before = math.prod(src[: t.dim]) * t.outer
        for k in reversed(range(len(dst))):
            suffix = math.prod(dst[k + 1 :])
            if suffix <= r < suffix * dst[k]:
                break
        else:
            raise _Stop("view merges the token dim away")
        if r % suffix:
            raise _Stop("view splits the token dim")
        inner = r // suffix
        if dst[k] % (inner * self.seq):
            raise _Stop("view splits the token dim")
        outer = dst[k] // (inner * self.seq)
        if math.prod(dst[:k]) * outer != before:
            raise _Stop("view mixes the token dim with another dim")
        return Tok(k, outer, inner)

    def transpose(self, n):
        t = self.lay(n.args[0])
        nd = len(_shape(n))
        a, b = _norm(n.args[1], nd), _norm(n.args[2], nd)
        d = b if t.dim == a else a if t.dim == b else t.dim
        return Tok(d, t.outer, t.inner)

    def t(self, n):
        t = self.lay(n.args[0])
        if len(_shape(n)) < 2:
            return t
        return Tok(1 - t.dim, t.outer, t.inner)

    def permute(self, n):
        t = self.lay(n.args[0])
        dims = [_norm(d, len(_shape(n))) for d in n.args[1]]
        return Tok(dims.index(t.dim), t.outer, t.inner)

    def unsqueeze(self, n):
        t = self.lay(n.args[0])
        d = _norm(n.args[1], len(_shape(n)))
        return Tok(t.dim + (1 if d <= t.dim else 0), t.outer, t.inner)

    def squeeze(self, n):
        t = self.lay(n.args[0])
        src = _shape(n.args[0])
        dims = n.args[1] if len(n.args) > 1 else [i for i, s in enumerate(src) if s == 1]
        dims = [dims] if isinstance(dims, int) else dims
        dims = {_norm(d, len(src)) for d in dims if src[_norm(d, len(src))] == 1}
        if t.dim in dims:
            raise _Stop("squeeze of the token dim")
        return Tok(t.dim - sum(1 for d in dims if d < t.dim), t.outer, t.inner)

    def expand(self, n):
        t = self.lay(n.args[0])
        off = len(_shape(n)) - len(_shape(n.args[0]))
        if _shape(n)[t.dim + off] != _shape(n.args[0])[t.dim]:
            raise _Stop("expand of the token dim")
        return Tok(t.dim + off, t.outer, t.inner)

    def slice(self, n):
        t = self.lay(n.args[0])
        src = _shape(n.args[0])
        dim = _norm(n.args[1] if len(n.args) > 1 else 0, len(src))
        if dim != t.dim:
            return t
        if _shape(n)[dim] == src[dim]:
            return t  # a full slice (``hidden[:, -0:]``)
        raise _Stop("slice along the tokens")

    def select(self, n):
        t = self.lay(n.args[0])
        dim = _norm(n.args[1], len(_shape(n.args[0])))
        if dim == t.dim:
            raise _Stop("select of one token")
        return Tok(t.dim - (1 if dim < t.dim else 0), t.outer, t.inner)

    def split(self, n):
        t = self.lay(n.args[0])
        src = _shape(n.args[0])
        dim = _norm(n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0), len(src))
        if dim == t.dim:
            raise _Stop("split along the tokens")
        return tuple(t for _ in _val(n))

    def cat(self, n):
        tensors = n.args[0]
        lays = [self.lay(a) for a in tensors]
        nd = len(_shape(n))
        dim = _norm(n.args[1] if len(n.args) > 1 else 0, nd)
        first = next((x for x in lays if isinstance(x, Tok)), None)
        if any(x != first for x in lays):
            raise _Stop("cat of values with different token layouts (or without tokens)")
        if first.dim == dim:
            raise _Stop("cat along the tokens")
        return first

    def mm(self, n):
        """``x @ W``: rows of x are tokens, W is shared (a weight); tokens in W would be contracted."""
        ta, tb = self.lay(n.args[-2]), self.lay(n.args[-1])
        if isinstance(tb, Tok) or not isinstance(ta, Tok) or ta.dim != 0:
            raise _Stop("matmul contracts over the tokens")
        return ta

    def addmm(self, n):
        if isinstance(self.lay(n.args[0]), Tok):
            raise _Stop("addmm with a per-token bias")
        return self.mm(n)

    def bmm(self, n):
        ta, tb = self.lay(n.args[0]), self.lay(n.args[1])
        if isinstance(ta, Tok) and tb is None and ta.dim == 1:
            return ta
        if isinstance(ta, Tok) and ta == tb and ta.dim == 0:
            return ta
        raise _Stop("batched matmul contracts over the tokens")

    def layer_norm(self, n):
        t = self.lay(n.args[0])
        nd = len(_shape(n.args[0]))
        if t.dim >= nd - len(n.args[1]):
            raise _Stop("layer norm over the tokens")
        for a in n.args[2:4]:
            if isinstance(self.lay(a), Tok):
                raise _Stop("layer norm with per-token weights")
        return (t, t, t)

    def softmax(self, n):
        t = self.lay(n.args[0])
        if _norm(n.args[1], len(_shape(n))) == t.dim:
            raise _Stop("softmax over the tokens")
        return t

    def reduce(self, n):
        """sum/mean/amax over dims: row-local if the tokens are kept, else a token reduction."""
        t = self.lay(n.args[0])
        src = _shape(n.args[0])
        dims = n.args[1] if len(n.args) > 1 and n.args[1] is not None else list(range(len(src)))
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = sorted({_norm(d, len(src)) for d in dims}) or list(range(len(src)))
        keep = (n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)) if n.target not in (aten.sum.default, aten.mean.default) else False
        if t.dim not in dims:
            return Tok(t.dim if keep else t.dim - sum(1 for d in dims if d < t.dim), t.outer, t.inner)
        if n.kwargs.get("dtype") is not None:
            raise _Stop("reduction over the tokens with a dtype")
        kind = {aten.sum.dim_IntList: SUM, aten.sum.default: SUM, aten.mean.dim: MEAN, aten.mean.default: MEAN}.get(n.target)
        if kind is None:
            raise _Stop(f"{_opname(n)} over the tokens (only sums and means can be accumulated across chunks)")
        self.info.member[n] = kind
        return None

    def nll(self, n):
        x, target = n.args[0], n.args[1]
        tx, tt = self.lay(x), self.lay(target)
        if not isinstance(tx, Tok) or tx.dim != 0 or len(_shape(x)) != 2:
            raise _Stop("nll_loss over a non-token batch dim")
        if tt is None:
            if _shape(target)[0] != _shape(x)[0]:
                raise _Stop("nll_loss target does not match")
            self.info.inferred[(n, target)] = tx
        elif tt != tx:
            raise _Stop("nll_loss target laid out differently")
        if isinstance(self.lay(n.args[2]), Tok):
            raise _Stop("per-token class weights")
        reduction = n.args[3]
        if reduction == 0:
            raise _Stop("nll_loss with reduction='none'")  # total_weight would be meaningless per chunk
        self.info.member[n] = NLL if reduction == 1 else SUM + "_nll"
        return None

    def embedding(self, n):
        w, idx = n.args[0], n.args[1]
        if isinstance(self.lay(w), Tok):
            raise _Stop("embedding table indexed by tokens")
        return self.lay(idx)

    def getitem(self, n):
        src = self.lay(n.args[0])
        return src[n.args[1]] if isinstance(src, tuple) else None


def _opname(n) -> str:
    t = n.target
    return getattr(t, "__name__", str(t)) if not hasattr(t, "_schema") else str(t).replace("aten.", "").replace(".default", "")


def _flat(args, kwargs):
    out = []
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, (list, tuple)):
            out.extend(a)
        else:
            out.append(a)
    return out


_VIEW = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.alias.default}
_SAME = {aten.clone.default, aten._to_copy.default, aten.alias.default, aten.detach.default, aten.contiguous.default}
_ATTENTION = {
    getattr(aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "scaled_dot_product_attention",
        "_scaled_dot_product_attention_math",
    )
    if hasattr(aten, name)
}


def _rule_for(n, r: _Rules):
    t = n.target
    if _mutates(n):
        return None
    if t is operator.getitem:
        return r.getitem
    if t in (aten.view.default, aten._unsafe_view.default, aten.reshape.default):
        return r.view
    if t in _SAME:
        return r.same
    table = {
        aten.transpose.int: r.transpose,
        aten.t.default: r.t,
        aten.permute.default: r.permute,
        aten.unsqueeze.default: r.unsqueeze,
        aten.squeeze.dim: r.squeeze,
        aten.squeeze.dims: r.squeeze,
        aten.squeeze.default: r.squeeze,
        aten.expand.default: r.expand,
        aten.slice.Tensor: r.slice,
        aten.select.int: r.select,
        aten.split.Tensor: r.split,
        aten.split_with_sizes.default: r.split,
        aten.cat.default: r.cat,
        aten.mm.default: r.mm,
        aten.addmm.default: r.addmm,
        aten.bmm.default: r.bmm,
        aten.native_layer_norm.default: r.layer_norm,
        aten._softmax.default: r.softmax,
        aten._log_softmax.default: r.softmax,
        aten.sum.dim_IntList: r.reduce,
        aten.sum.default: r.reduce,
        aten.mean.dim: r.reduce,
        aten.mean.default: r.reduce,
        aten.amax.default: r.reduce,
        aten.nll_loss_forward.default: r.nll,
        aten.embedding.default: r.embedding,
    }
    if t in table:
        return table[t]
    if hasattr(t, "tags") and torch.Tag.pointwise in t.tags and not _random(n):
        return r.pointwise
    if t in (aten.where.self, aten.masked_fill.Scalar, aten.masked_fill.Tensor):
        return r.pointwise
    return None


def _mutates(n) -> bool:
    """In-place and out= ops: a chunk loop would write each chunk into its own slice, not the tensor."""
    schema = getattr(n.target, "_schema", None)
    return schema is not None and (schema.is_mutable or torch.Tag.inplace in n.target.tags)


def _random(n) -> bool:
    t = n.target
    return hasattr(t, "tags") and torch.Tag.nondeterministic_seeded in t.tags


def seq_len_of(example_inputs) -> int | None:
    """The sequence length: the last dim of the first integer ``[batch, seq]`` input (input_ids)."""
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and not x.dtype.is_floating_point and x.dtype != torch.bool:
            return int(x.shape[-1])
    return None


def analyse(gm: torch.fx.GraphModule, seq: int, attention: bool = True) -> _Info:
    """Propagate token layouts from the token inputs and mark the row-local ops."""
    info = _Info()
    rules = _Rules(info, seq)
    for n in gm.graph.nodes:
        v = _val(n)
        if n.op == "placeholder":
            if isinstance(v, torch.Tensor) and v.dim() >= 2 and not v.dtype.is_floating_point and v.shape[-1] == seq:
                info.layout[n] = Tok(v.dim() - 1)
            continue
        if n.op != "call_function":
            continue
        if n.target is operator.getitem and info.member.get(n.args[0], "row") not in ("row", "attn"):
            info.member[n] = "item"  # an output of a token reduction (the loss, its normaliser)
            info.layout[n] = None
            continue
        ins = [a for a in n.all_input_nodes]
        has_tok = any(_has_tok(info.layout.get(a)) for a in ins)
        if not has_tok:
            if n.target is aten.arange.default and isinstance(v, torch.Tensor) and v.dim() == 1 and v.shape[0] == seq:
                info.layout[n] = Tok(0)  # positions: one per token
            continue
        if n.target is operator.getitem and n.args[0] not in info.member:
            src = info.layout.get(n.args[0])
            info.layout[n] = src[n.args[1]] if isinstance(src, tuple) else None
            continue
        rule = _rule_for(n, rules)
        if n.target in _ATTENTION:
            q = info.layout.get(n.args[0])
            info.layout[n] = (q, q) + (None,) * 10 if isinstance(q, Tok) else None
            mode, why = _attention_mode(n, info, seq) if attention else (
                None, "attention mixes the tokens (not streamed by query chunks: not needed for the budget)")
            if mode is not None:
                info.member[n] = "attn"  # streamed by query chunks against the prefix (or all) of K and V
                info.attn[n] = mode
            else:
                info.reason[n] = why
            continue
        if rule is None:
            info.reason[n] = ("random op (its mask cannot be drawn chunk by chunk as it is drawn whole)"
                              if _random(n) else "in-place op" if _mutates(n) else "no streaming rule for this op")
            _keep_layout(n, info)
            continue
        try:
            out = rule(n)
        except _Stop as e:
            info.reason[n] = str(e)
            _keep_layout(n, info)
            continue
        info.layout[n] = out
        info.member.setdefault(n, "row")
    return info


_CAUSAL_CPU = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu").default


def _attention_mode(n, info: _Info, seq: int) -> tuple[str | None, str | None]:
    """How an attention runs by query chunks, or why it cannot (for the report).

    ``"prefix"``: each chunk against the keys and values of its prefix, causal alignment lower-right —
    for ``is_causal=True``, and for an explicit mask that provably allows no key after its query
    (:func:`_implies_causal`: HF's padding masks are ``causal & padding``). ``"whole"``: each chunk
    against all keys, the mask's rows sliced with the queries — for a non-causal attention (BERT) and a
    mask nothing proves causal. Exact either way: every query row sees the same keys with the same
    mask entries as in the whole attention (the prefix drops only keys its mask rules out)."""
    if n.target is not _CAUSAL_CPU:
        return None, "attention mixes the tokens (only the CPU flash kernel is streamed by query chunks so far)"
    args = list(n.args) + [None] * 5
    dropout = args[3] if args[3] is not None else n.kwargs.get("dropout_p", 0.0)
    causal = args[4] if args[4] is not None else n.kwargs.get("is_causal", False)
    mask = n.kwargs.get("attn_mask")
    if dropout:
        return None, "attention with dropout (its mask cannot be drawn chunk by chunk as it is drawn whole)"
    lays = [info.layout.get(a) for a in n.args[:3]]
    shapes = [_shape(a) for a in n.args[:3]]
    if not all(isinstance(t, Tok) and t.outer == 1 and t.inner == 1 and t.dim == len(sh) - 2 and sh[-2] == seq
               for t, sh in zip(lays, shapes)):
        return None, "attention whose query, key and value do not hold the tokens in dim -2"
    if mask is None:
        return ("prefix" if causal else "whole"), None
    if not isinstance(mask, torch.fx.Node) or not isinstance(_val(mask), torch.Tensor):
        return None, "attention with a mask that is not a tensor"
    ms = _shape(mask)
    if len(ms) < 2 or ms[-2] not in (1, seq) or ms[-1] not in (1, seq) or len(ms) > 4:
        return None, f"attention with a mask of shape {list(ms)} (not [..., queries | 1, keys | 1])"
    # the mask's rows follow the query chunks (a mask broadcast over the queries is shared by all chunks)
    info.inferred[(n, mask)] = Tok(len(ms) - 2) if ms[-2] == seq else None
    if causal:
        return None, "attention with both is_causal and a mask"
    return ("prefix" if _implies_causal(mask, seq) else "whole"), None


_PASS = {aten.expand.default, aten.unsqueeze.default, aten.view.default, aten._unsafe_view.default, aten.reshape.default,
         aten.clone.default, aten.alias.default, aten.contiguous.default, aten._to_copy.default}


def _implies_causal(m, seq: int) -> bool:
    """True when mask ``m`` (boolean, or additive 0/-inf) provably allows no key after its query:
    ``m[..., q, k]`` allowed implies ``k <= q``. Proven on the graph that made it: a ``where(c, 0,
    -inf)`` of a conjunction (``&``) one of whose terms compares key positions with query positions
    (``k <= q``, ``k < q``, ``q >= k``, ``q > k``), the positions being ``arange(seq)`` (plus 0) laid
    along the key dim (-1) and the query dim (-2). Anything else: False (the chunks then read all keys)."""
    if not isinstance(m, torch.fx.Node) or m.op != "call_function":
        return False
    t, sh = m.target, _shape(m) if isinstance(_val(m), torch.Tensor) else ()
    if len(sh) < 2 or sh[-2:] != (seq, seq):
        return False
    if t is aten.where.self:
        return _scalar(m.args[1]) == 0 and _scalar(m.args[2]) == float("-inf") and _implies_causal(m.args[0], seq)
    if t in _PASS:
        src = m.args[0]
        return (isinstance(src, torch.fx.Node) and isinstance(_val(src), torch.Tensor) and len(_shape(src)) >= 2
                and _shape(src)[-2:] == (seq, seq) and _implies_causal(src, seq))
    if t in (aten.bitwise_and.Tensor, aten.logical_and.default, aten.mul.Tensor) and _val(m).dtype == torch.bool:
        return any(_implies_causal(a, seq) for a in m.args[:2])
    pairs = {aten.le.Tensor: (0, 1), aten.lt.Tensor: (0, 1), aten.ge.Tensor: (1, 0), aten.gt.Tensor: (1, 0)}
    if t in pairs:
        k, q = (m.args[i] for i in pairs[t])
        return _positions(k, seq) == -1 and _positions(q, seq) == -2
    return False


def _scalar(a):
    """The value of a Python number or a ``scalar_tensor``/``full([], v)`` node, else None."""
    if isinstance(a, (int, float)):
        return float(a)
    if isinstance(a, torch.fx.Node) and a.op == "call_function":
        if a.target is aten.scalar_tensor.default:
            return float(a.args[0])
        if a.target is aten.full.default and list(a.args[0]) == []:
            return float(a.args[1])
    return None


def _positions(p, seq: int) -> int | None:
    """The dim (from the end) along which ``p`` holds the positions ``0 .. seq-1`` (``arange(seq)``,
    plus 0, unsqueezed, expanded or viewed, every other dim of size 1 before broadcasting), else None."""
    if not isinstance(p, torch.fx.Node) or not isinstance(_val(p), torch.Tensor):
        return None
    sh = _shape(p)
    if sh.count(seq) != 1 or any(s not in (1, seq) for s in sh):
        return None
    where = sh.index(seq) - len(sh)
    x = p
    while True:
        if x.op != "call_function":
            return None
        t = x.target
        if t is aten.arange.default:
            return where if list(x.args) == [seq] else None
        if t is aten.arange.start:
            return where if list(x.args[:2]) == [0, seq] else None
        if t is aten.arange.start_step:
            return where if list(x.args[:3]) == [0, seq, 1] else None
        if t in (aten.add.Tensor, aten.add.Scalar) and _scalar(x.args[1]) == 0 and len(x.args) == 2:
            x = x.args[0]
        elif t in (aten.unsqueeze.default, aten.view.default, aten._unsafe_view.default, aten.reshape.default,
                   aten.clone.default, aten.alias.default, aten._to_copy.default):
            x = x.args[0]
        else:
            return None
        if not isinstance(x, torch.fx.Node) or not isinstance(_val(x), torch.Tensor):
            return None
        xs = _shape(x)
        if xs.count(seq) != 1 or any(s not in (1, seq) for s in xs):
            return None


def _keep_layout(n, info: _Info) -> None:
    """An op outside every region (it mixes tokens, or has no rule) whose output has its first token
    input's shape keeps that input's token dim (``cumsum`` over the tokens, a causal mix): the ops after
    it can still form a region, taking its output, sliced along that dim, as an input. Not claimed:
    that the op is row-local. A multi-output op keeps it in each output of that shape (``native_dropout``:
    the dropped values and the mask; without it, nothing after a GPT-2's first dropout was streamed)."""
    v = _val(n)
    for a in n.all_input_nodes:
        t = info.layout.get(a)
        if isinstance(t, Tok):
            if isinstance(v, torch.Tensor) and tuple(v.shape) == _shape(a):
                info.layout[n] = t
            elif isinstance(v, (list, tuple)):
                kept = tuple(t if isinstance(x, torch.Tensor) and tuple(x.shape) == _shape(a) else None for x in v)
                if any(k is not None for k in kept):
                    info.layout[n] = kept
            return


def _has_tok(x) -> bool:
    return isinstance(x, Tok) or (isinstance(x, tuple) and any(isinstance(t, Tok) for t in x))


_HEAVY = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten._log_softmax.default, aten._softmax.default, *_ATTENTION}


def find_regions(gm: torch.fx.GraphModule, seq: int, chunks: int, needs_grad: set,
                 attention: bool = True) -> tuple[StreamPlan, _Info]:
    """The regions worth streaming (they hold a matmul or a softmax), with the ops that ended them."""
    info = analyse(gm, seq, attention)
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    members = [n for n in nodes if n in info.member]
    level = _levels(nodes, info)

    def joined(a, n):
        return level[a] == level[n] and (info.member[a] in ("row", "attn") or info.member[n] == "item")

    groups = connected_groups(members, lambda n: n.all_input_nodes, joined)
    regions = []
    notes = []
    for group in groups:
        if not any(n.target in _HEAVY for n in group):
            continue
        group = sorted(group, key=order.get)
        r = _region(f"s{len(regions)}", group, info, chunks, needs_grad)
        if r is not None:
            regions.append(r)
    stops = sorted({f"{_opname(n)}: {why}" for n, why in info.reason.items()})
    if stops:
        notes.append("stream: regions end at " + "; ".join(stops[:12]) + (" ..." if len(stops) > 12 else ""))
    return StreamPlan(seq, tuple(regions), tuple(notes)), info


def _levels(nodes, info: _Info) -> dict:
    """Split the row-local ops into chunk loops that can run one after another.

    A member reading a value that was computed outside the loops from a loop's output (an attention
    over the tokens of the layer before), or a token reduction's result, must run in a later loop:
    its level is one more. Members of one level joined by data edges form one region. The residual
    stream joins every layer's ops; the attentions cut it into one region per stretch between them.
    """
    level: dict = {}
    taint: dict = {}  # non-member -> highest level of the loops it depends on (-1: none)
    for n in nodes:
        ins = n.all_input_nodes
        if n in info.member:
            lv = 0
            attn = info.member[n] == "attn"  # its K and V must be whole before its first chunk runs
            for a in ins:
                if a in info.member:
                    kind_a = info.member[a]
                    same = (kind_a in ("row", "attn") or info.member[n] == "item") and not attn
                    lv = max(lv, level[a] if same else level[a] + 1)
                elif taint.get(a, -1) >= 0:
                    lv = max(lv, taint[a] + 1)
            level[n] = lv
        else:
            t = -1
            for a in ins:
                t = max(t, level[a] if a in info.member else taint.get(a, -1))
            taint[n] = t
    return level


def _region(name, group, info, chunks, needs_grad) -> RegionPlan | None:
    gset = set(group)
    inputs, input_layouts = [], []
    for n in group:
        for a in n.all_input_nodes:
            if a in gset or a in inputs:
                continue
            lay = info.layout.get(a)
            if not isinstance(lay, Tok):
                lay = next((t for (m, x), t in info.inferred.items() if x is a and m in gset), None)
            if isinstance(info.layout.get(a), tuple):
                return None  # a multi-output value is taken through its getitems
            masked = [m for m in a.users if m in gset and info.member.get(m) == "attn" and m.kwargs.get("attn_mask") is a]
            if masked:
                if any(m in gset and m not in masked for m in a.users) or a in masked[0].args[:3]:
                    return None  # a mask is sliced by query rows (its own dim -2): not read as anything else
                lay = info.inferred[(masked[0], a)]  # the attention's reading, whatever layout the mask had
            kv = [m for m in a.users if m in gset and info.member.get(m) == "attn" and a in m.args[1:3]]
            if kv:
                modes = {info.attn[m] for m in kv}
                if any(m in gset and m not in kv for m in a.users) or a in kv[0].args[:1] or len(modes) > 1:
                    return None  # read whole by the attention and by rows elsewhere: not both
                lay = dataclasses.replace(lay, prefix=modes == {"prefix"}, whole=modes == {"whole"})
            inputs.append(a)
            input_layouts.append(lay)
    outputs, output_layouts = [], []
    for n in group:
        used_outside = any(u not in gset for u in n.users) or n.op == "output"
        kind = info.member[n]
        if kind == "item":
            outputs.append(n)
            output_layouts.append(f"{info.member[n.args[0]]}[{n.args[1]}]")
            continue
        if kind != "row":
            if not isinstance(_val(n), (list, tuple)):  # nll_loss is taken through its getitems
                outputs.append(n)
                output_layouts.append(kind)
            continue
        if used_outside and isinstance(_val(n), torch.Tensor):
            outputs.append(n)
            output_layouts.append(info.layout.get(n))
    if not outputs or any(o is None for o in output_layouts):
        return None
    region_bytes = sum(_nbytes(n) for n in group if n not in outputs)
    diff_outputs = [o for o, lay in zip(outputs, output_layouts) if o in needs_grad and _val(o).dtype.is_floating_point]
    reduction_only = all(isinstance(lay, str) for o, lay in zip(outputs, output_layouts) if o in diff_outputs)
    grad_in_forward = bool(diff_outputs) and reduction_only and len(diff_outputs) == 1
    return RegionPlan(
        name=name,
        nodes=tuple(n.name for n in group),
        inputs=tuple(a.name for a in inputs),
        input_layouts=tuple(input_layouts),
        outputs=tuple(o.name for o in outputs),
        output_layouts=tuple(output_layouts),
        chunks=chunks,
        grad_in_forward=grad_in_forward,
        region_bytes=region_bytes,
        attentions=tuple((n.name, info.attn[n]) for n in group if n in info.attn),
    )


def _nbytes(n) -> int:
    v = _val(n)
    vals = v if isinstance(v, (list, tuple)) else [v]
    return sum(t.numel() * t.element_size() for t in vals if isinstance(t, torch.Tensor))


#: Fewest tokens per chunk the planner picks by itself (a budget can push it down to
#: ``MIN_BUDGET_CHUNK_TOKENS``).
MIN_CHUNK_TOKENS = 128
#: Fewest tokens per chunk under any budget: narrower chunks make matmuls too thin to be worth a launch.
MIN_BUDGET_CHUNK_TOKENS = 16
#: Most chunks for a region with an attention: its chunk graphs are traced once per prefix length
#: (about 50 ms each), so 1024 chunks of a 16k sequence would spend a minute tracing.
MAX_ATTENTION_CHUNKS = 64


def plan_stream(gm: torch.fx.GraphModule, example_inputs, options, needs_grad: set, multiplier: float = 1,
                largest: int | None = None, attention: bool = False) -> tuple[StreamPlan, _Info]:
    """The stream plan for one graph: its regions and each one's chunk count.

    ``stream_chunks`` fixes the count. Otherwise each region gets the fewest chunks (a power of two)
    that bring its intermediates per chunk under one full-sequence hidden state (its largest token
    input), with at least ``MIN_CHUNK_TOKENS`` tokens per chunk: past that the full-length inputs and
    gradients dominate the peak, and thinner chunks make thin matmuls. Measured on a 2-layer GPT,
    32k vocabulary, 4096 tokens, Inductor (plain step 590 MiB, 1.30 s): 32 chunks of 128 tokens
    114 MiB, 1.46 s; 64 chunks 89 MiB, 1.81 s; 256 chunks 71 MiB, 3.20 s. ``multiplier`` scales the
    counts (below 1, for a budget met with fewer chunks: at least 2 each), and ``largest`` keeps only
    that many regions, those with the most intermediates (the backend searches both against the budget:
    a region left alone keeps Inductor's fused kernels).
    """
    from memfit.errors import CantApply
    from memfit.planner.shapes import has_symbolic_sizes

    seq = seq_len_of(example_inputs)
    if seq is None:
        raise CantApply("no integer [batch, seq] input (input_ids) to stream along")
    if has_symbolic_sizes(gm):
        raise CantApply("dynamic shapes: streaming needs a static sequence length", "dynamic_shapes")
    if options.stream_attention is not None:
        attention = options.stream_attention
    plan, info = find_regions(gm, seq, options.stream_chunks or 1, needs_grad, attention)
    if largest is not None:
        keep = {r.name for r in sorted(plan.regions, key=lambda r: -r.region_bytes)[:largest]}
        skipped = [r for r in plan.regions if r.name not in keep]
        plan = dataclasses.replace(plan, regions=tuple(r for r in plan.regions if r.name in keep), notes=plan.notes + (
            (f"stream: regions {', '.join(r.name for r in skipped)} left unstreamed: the budget is met without them",)
            if skipped else ()))
    if options.stream_chunks is None:
        by = {n.name: n for n in gm.graph.nodes}
        regions = []
        for r in plan.regions:
            tok_in = [by[i] for i, lay in zip(r.inputs, r.input_layouts) if isinstance(lay, Tok)]
            hidden = max((_nbytes(n) for n in tok_in), default=1)
            k = 1
            while r.region_bytes / k > hidden and seq // (2 * k) >= MIN_CHUNK_TOKENS:
                k *= 2
            k = min(k * multiplier, max(seq // MIN_BUDGET_CHUNK_TOKENS, 1)) if multiplier >= 1 else max(min(k, 2), int(k * multiplier))
            if any(isinstance(lay, Tok) and lay.shared_rows for lay in r.input_layouts):
                k = min(k, MAX_ATTENTION_CHUNKS)
            regions.append(dataclasses.replace(r, chunks=k))
        plan = dataclasses.replace(plan, regions=tuple(regions))
    if options.inner == "inductor":
        plan = dataclasses.replace(plan, regions=tuple(
            dataclasses.replace(r, fused=not any(m == "prefix" for _, m in r.attentions)) for r in plan.regions))
    plan = dataclasses.replace(plan, notes=plan.notes + tuple(
        f"stream: region {r.name} ({len(r.nodes)} ops, {r.region_bytes / 2**20:.2f} MiB of intermediates) in "
        f"{r.chunks} chunks{', gradients computed in the forward' if r.grad_in_forward else ''}{_attention_note(r)}"
        for r in plan.regions))
    return plan, info


def _attention_note(r: RegionPlan) -> str:
    """How the region's attentions read the keys, for the report (a whole read costs a causal attention
    twice the FLOPs of a prefix read)."""
    modes = [m for _, m in r.attentions]
    if not modes:
        return ""
    parts = []
    if modes.count("prefix"):
        parts.append(f"{modes.count('prefix')} against their prefix (causal)")
    if modes.count("whole"):
        parts.append(f"{modes.count('whole')} against all keys (not causal, or a mask not provably causal)")
    return ", attentions by query chunks: " + ", ".join(parts)
