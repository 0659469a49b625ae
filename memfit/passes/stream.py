"""Carry out a :class:`~memfit.planner.stream.StreamPlan`: each region becomes one opaque op that
runs the region chunk by chunk along the sequence, in the forward and in the backward.

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

The memory model sees the op's outputs as usual plus its chunk's own peak (``SCRATCH``), and the cost
model prices it as its chunk graphs times the chunk count.
"""

from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch._subclasses.fake_tensor import FakeTensorMode

from memfit.passes import CantApply
from memfit.planner.stream import MEAN, NLL, SUM, RegionPlan, StreamPlan, Tok

aten = torch.ops.aten

#: key -> _Region, for the custom ops (a compiled graph holds only the key)
REGISTRY: dict[str, "_Region"] = {}
_keys = itertools.count()


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
    """
    mode = FakeTensorMode()
    fakes = fake_inputs(example_inputs, mode)
    with mode:
        traced = make_fx(gm, tracing_mode="real")(*fakes)
    traced.graph.eliminate_dead_code()
    traced.recompile()
    return traced


def needs_grad(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> set:
    out = set()
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for n, x in zip(ph, example_inputs):
        if isinstance(x, torch.Tensor) and x.requires_grad:
            out.add(n)
    for n in gm.graph.nodes:
        if n.op == "call_function" and any(a in out for a in n.all_input_nodes):
            v = n.meta.get("val")
            vals = v if isinstance(v, (list, tuple)) else [v]
            if any(isinstance(t, torch.Tensor) and (t.dtype.is_floating_point or t.dtype.is_complex) for t in vals):
                out.add(n)
    return out


# -- one region at run time ----------------------------------------------------------------------------
@dataclass
class _Acc:
    """A token reduction of the region: each chunk adds its partial sum ``S`` (and ``W`` for nll)."""

    node: str
    kind: str
    count: int = 1  # mean: the number of elements averaged
    dtype: torch.dtype = torch.float32

    @property
    def width(self) -> int:
        """Partials per chunk: the sum, and for nll_loss its total weight too."""
        return 2 if self.kind in (NLL, SUM + "_nll") else 1


@dataclass
class _Region:
    plan: RegionPlan
    seq: int
    body: torch.fx.GraphModule
    """The region as a graph of its own, on full-size inputs: the chunk graphs are traced from it."""
    input_layouts: tuple
    needs: tuple[bool, ...]
    """Per input: whether the backward returns its gradient."""
    tok_outputs: list
    """(index in the op's outputs, Tok, full shape, dtype) of the outputs assembled from chunks."""
    accs: list
    outputs: list
    """Per op output: ("tok", i) | ("acc", j, item) — how it is made."""
    out_meta: list
    fwd: dict = field(default_factory=dict)
    bwd: dict = field(default_factory=dict)
    fwdbwd: dict = field(default_factory=dict)
    compiled: dict = field(default_factory=dict)
    """(kind, chunk key) -> the chunk graph compiled by Inductor (``plan.fused``), made on first use."""
    scratch_fwd: int = 0
    scratch_bwd: int = 0
    chunk_runs: int = 0
    """Chunk graphs run so far (forward and backward): the structure tests count them."""

    # chunk ranges
    def ranges(self):
        c = math.ceil(self.seq / self.plan.chunks)
        return [(s, min(s + c, self.seq)) for s in range(0, self.seq, c)]

    def conform(self, xs):
        """The inputs in the strides the chunk graphs were traced for. An op's real kernel may lay out
        its output unlike its fake one (seen on HF GPT-2): a traced ``view`` would then fail, so such an
        input is copied once into the traced layout."""
        out = []
        for x, (shape, dtype, device, stride) in zip(xs, self._xs_meta):
            if isinstance(x, torch.Tensor) and x.dim() and tuple(x.stride()) != stride:
                x = torch.empty_strided(shape, stride, dtype=x.dtype, device=x.device).copy_(x)
            out.append(x)
        return out

    def slice_inputs(self, xs, s, e):
        return [lay.rows(x, self.seq, *lay.span(self.seq, s, e)) if isinstance(lay, Tok) else x
                for x, lay in zip(xs, self.input_layouts)]

    def chunk_key(self, s, e):
        """The chunk graphs depend on the chunk's length, and on its end when an attention reads the prefix."""
        prefix = any(isinstance(lay, Tok) and lay.prefix for lay in self.input_layouts)
        return (e - s, e if prefix else None)

    # chunk graphs, traced on first use per chunk size
    def _chunk_fakes(self, xs_meta, key, extra=()):
        c, e = key
        mode = FakeTensorMode()
        with mode:
            out = []
            for (shape, dtype, device, stride), lay in zip(xs_meta, self.input_layouts):
                full = torch.empty_strided(shape, stride, dtype=dtype, device=device)
                # sliced as at run time, so the traced graph copies exactly where a view would fail
                if isinstance(lay, Tok):
                    s = (e - c, e) if e is not None else (0, c)  # e: the chunk's end, where it matters
                    full = lay.rows(full, self.seq, *lay.span(self.seq, *s))
                out.append(full)
            out += [torch.empty(shape, dtype=dtype, device=device) for shape, dtype, device in extra]
        return mode, out

    def chunk_forward_fn(self, c):
        """A callable running the region on ``c`` tokens: token outputs, then each reduction's partials."""
        body = self.body
        seq = self.seq

        def run(*xs):
            env = {}
            ph = iter(xs)
            outs = []
            for n in body.graph.nodes:
                if n.op == "placeholder":
                    env[n] = next(ph)
                elif n.op == "output":
                    break
                else:
                    args = torch.fx.node.map_arg(n.args, lambda a: env[a])
                    kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: env[a])
                    env[n] = _run_chunked(n, args, kwargs, seq, c)
            for kind, *rest in self._chunk_out_spec():
                if kind == "tok":
                    outs.append(env[self._nodes[rest[0]]])
                else:
                    v = env[self._nodes[rest[0]]]
                    outs.extend(v if isinstance(v, (list, tuple)) else [v])
            return tuple(outs)

        return run

    def _chunk_out_spec(self):
        return [("tok", name) for name in self._tok_names] + [("acc", a.node) for a in self.accs]

    def prepare(self) -> None:
        """Trace the chunk graphs now, at compile time: the op's body runs below autograd, where
        ``autograd.grad`` cannot be traced. Their simulated peaks are the op's scratch memory."""
        from memfit.planner.memory import GraphPair, simulate

        def peak(g):
            n_out = len(next(n for n in g.graph.nodes if n.op == "output").args[0])
            # in-place accumulations alias their accumulator (an input: the op's own output)
            return simulate([GraphPair(g, None, n_out)]).peak_bytes

        for key in sorted({self.chunk_key(s, e) for s, e in self.ranges()}, key=str):
            if self.plan.grad_in_forward:
                self.scratch_fwd = max(self.scratch_fwd, peak(self.traced(self.fwdbwd, key, "fwdbwd")))
            else:
                self.scratch_fwd = max(self.scratch_fwd, peak(self.traced(self.fwd, key, "fwd")))
                self.scratch_bwd = max(self.scratch_bwd, peak(self.traced(self.bwd, key, "bwd")))

    def time(self, profile, backward: bool) -> float:
        """Roofline time of the op: its chunk graphs, once per chunk."""
        from memfit.planner.cost import node_time

        table = self.bwd if backward else (self.fwdbwd if self.plan.grad_in_forward else self.fwd)
        return sum(sum(node_time(n, profile) for n in table[self.chunk_key(s, e)].graph.nodes) for s, e in self.ranges())

    def traced(self, table, key, kind):
        if key in table:
            return table[key]
        c = key[0]
        fn = self.chunk_forward_fn(c)
        n_in = len(self.input_layouts)
        if kind == "fwd":
            mode, fakes = self._chunk_fakes(self._xs_meta, key)
            with mode:
                g = make_fx(fn, tracing_mode="real")(*fakes)
        else:
            diff_idx = self._diff_positions()
            gmeta = []
            mode, fakes0 = self._chunk_fakes(self._xs_meta, key)
            with mode:
                probe = fn(*fakes0)
            for i in diff_idx:
                gmeta.append((tuple(probe[i].shape), probe[i].dtype, probe[i].device))
            extra = gmeta if kind == "bwd" else []
            mode, fakes = self._chunk_fakes(self._xs_meta, key, extra)
            needs = self.needs

            def vjp(*args):
                xs, gs = list(args[:n_in]), list(args[n_in:])
                leaves = [x.detach().requires_grad_(True) if need else x for x, need in zip(xs, needs)]
                with torch.enable_grad():
                    outs = fn(*leaves)
                targets = [outs[i] for i in diff_idx]
                if kind == "fwdbwd":
                    gs = [torch.ones_like(t) for t in targets]
                wrt = [x for x, need in zip(leaves, needs) if need]
                grads = torch.autograd.grad(targets, wrt, gs, allow_unused=True)
                grads = [g if g is not None else torch.zeros_like(w) for g, w in zip(grads, wrt)]
                if kind == "fwdbwd":
                    return tuple(o.detach() for o in outs) + tuple(grads)
                return tuple(grads)

            with mode:
                g = make_fx(vjp, tracing_mode="real")(*fakes)
        g.graph.eliminate_dead_code()
        if kind != "fwd":
            _cross_entropy_grad_in_place(g)
            _accumulate_in_place(g, self._shared_grad_positions(kind))
        g.recompile()
        table[key] = g
        return g

    def runner(self, table, key, kind):
        """The chunk graph to run: as traced, or compiled by Inductor when the plan says so (fused)."""
        g = self.traced(table, key, kind)
        if not self.plan.fused:
            return g
        got = self.compiled.get((kind, key))
        if got is None:
            def first(*args):  # compiled for the real inputs of its first chunk
                from torch._inductor.compile_fx import compile_fx

                self.compiled[(kind, key)] = fn = compile_fx(g, list(args))
                return fn(*args)

            return first
        return got

    def _shared_grad_positions(self, kind):
        """Positions among the chunk graph's outputs of the gradients of shared inputs (weights)."""
        first = len(self._tok_names) + sum(a.width for a in self.accs) if kind == "fwdbwd" else 0
        grads = [lay for lay, need in zip(self.input_layouts, self.needs) if need]
        return [first + i for i, lay in enumerate(grads) if not isinstance(lay, Tok)]

    def _accumulators(self, gfull):
        """The full gradients of the shared inputs, which the chunk graphs add into in place."""
        grads = [lay for lay, need in zip(self.input_layouts, self.needs) if need]
        return [gf for gf, lay in zip(gfull, grads) if not isinstance(lay, Tok)]

    def _diff_positions(self):
        """Positions, among the chunk graph's outputs, of those that get an incoming gradient."""
        pos, out = 0, []
        for kind, name in self._chunk_out_spec():
            if kind == "tok":
                if self._tok_diff[name]:
                    out.append(pos)
                pos += 1
            else:
                acc = next(a for a in self.accs if a.node == name)
                if acc.dtype.is_floating_point and self._acc_diff[name]:
                    out.append(pos)
                pos += acc.width
        return out

    def run_forward(self, xs):
        given, xs = xs, self.conform(xs)  # gradients take the given inputs' strides (the fake kernel's)
        device = xs[0].device
        grad_mode = self.plan.grad_in_forward
        # the outputs keep the strides the graph had for them (a later ``view`` may rely on them)
        tok_full = [torch.empty_strided(shape, self.out_meta[i][2], dtype=dtype, device=device)
                    for (i, _, shape, dtype) in self.tok_outputs]
        partial: list = [None] * sum(a.width for a in self.accs)
        gfull = []
        if grad_mode:
            gfull = [torch.zeros_like(x) for x, need in zip(given, self.needs) if need]
        for s, e in self.ranges():
            xc = self.slice_inputs(xs, s, e)
            g = self.runner(self.fwdbwd if grad_mode else self.fwd, self.chunk_key(s, e), "fwdbwd" if grad_mode else "fwd")
            res = list(g(*xc, *self._accumulators(gfull)))
            self.chunk_runs += 1
            n_chunk_out = len(self._tok_names) + len(partial)
            outs, gs = res[:n_chunk_out], res[n_chunk_out:]
            for (i, lay, _, _), full, v in zip(self.tok_outputs, tok_full, outs):
                lay.write(full, self.seq, s, e, v)
            for j, v in enumerate(outs[len(self._tok_names):]):
                partial[j] = v if partial[j] is None else partial[j] + v
            if grad_mode:
                self._write_token_grads(gfull, gs, s, e)
            del res, outs, gs, xc  # before the next chunk runs: two chunks' results never coexist
        results = []
        for m in self.outputs:
            if m[0] == "tok":
                results.append(tok_full[m[1]])
                continue
            _, j, item = m
            a = self.accs[j]
            base = self._acc_offset(j)
            if item == 1:  # nll_loss's total weight
                results.append(partial[base + 1])
            elif a.kind == NLL:
                results.append(partial[base] / partial[base + 1])
            elif a.kind == MEAN:
                results.append(partial[base] / a.count)
            else:
                results.append(partial[base])
        if grad_mode:
            # the gradients were of the partial sums: divide by the differentiable reduction's normaliser
            for j, a in enumerate(self.accs):
                if not self._acc_diff[a.node]:
                    continue
                if a.kind == NLL:
                    gfull = [g.mul_(1 / partial[self._acc_offset(j) + 1]) for g in gfull]
                elif a.kind == MEAN:
                    gfull = [g.mul_(1.0 / a.count) for g in gfull]
            results += gfull
        return results

    def _acc_offset(self, j: int) -> int:
        return sum(a.width for a in self.accs[:j])

    def run_backward(self, xs, small, grads):
        given, xs = xs, self.conform(xs)  # gradients take the given inputs' strides (the fake kernel's)
        gfull = [torch.zeros_like(x) for x, need in zip(given, self.needs) if need]
        # the incoming gradient of each reduction's partial sum
        acc_g = {}
        for m, g in zip(self.outputs, grads):
            if m[0] != "acc":
                continue
            _, j, item = m
            a = self.accs[j]
            if item == 0:
                if a.kind == NLL:
                    acc_g[j] = g / self._nll_weight(small, j)
                elif a.kind == MEAN:
                    acc_g[j] = g / a.count
                else:
                    acc_g[j] = g
        for s, e in self.ranges():
            xc = self.slice_inputs(xs, s, e)
            gc = []
            for kind, name in self._chunk_out_spec():
                if kind == "tok":
                    if self._tok_diff[name]:
                        i = self._tok_names.index(name)
                        idx, lay, _, _ = self.tok_outputs[i]
                        gc.append(lay.rows(grads[idx], self.seq, s, e))
                else:
                    j = next(j for j, a in enumerate(self.accs) if a.node == name)
                    a = self.accs[j]
                    if a.dtype.is_floating_point and self._acc_diff[name]:
                        gc.append(acc_g[j])
            got = self.runner(self.bwd, self.chunk_key(s, e), "bwd")(*xc, *[t.contiguous() for t in gc], *self._accumulators(gfull))
            self.chunk_runs += 1
            self._write_token_grads(gfull, got, s, e)
            del got, gc, xc  # before the next chunk runs
        return gfull

    def _nll_weight(self, small, j):
        """The total weight (count of non-ignored targets) of reduction ``j``, among the saved small outputs."""
        k = 0
        for m in self.outputs:
            if m[0] != "acc":
                continue
            if m[1] == j and m[2] == 1:
                return small[k]
            k += 1
        raise RuntimeError("memfit stream: the nll normaliser was not saved")

    def _write_token_grads(self, gfull, got, s, e):
        """Write a chunk's gradients of the token inputs into their rows (the shared inputs' gradients
        were accumulated in place by the chunk graph)."""
        k = 0
        for lay, need in zip(self.input_layouts, self.needs):
            if need:
                if isinstance(lay, Tok) and lay.shared_rows:  # keys/values: every later chunk adds to them
                    lay.rows(gfull[k], self.seq, *lay.span(self.seq, s, e)).add_(got[k])
                elif isinstance(lay, Tok):
                    lay.write(gfull[k], self.seq, s, e, got[k])
                k += 1


def _ce_grad(logp: torch.Tensor, target: torch.Tensor, grad: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The gradient of ``sum(nll_loss(logp, target))`` w.r.t. the log-softmax's input, written over
    ``logp``: ``grad * (softmax - onehot)`` on rows whose target is not ignored, 0 on the others."""
    valid = target != ignore_index
    g = (grad * valid).to(logp.dtype)
    p = logp.exp_().mul_(g.unsqueeze(1))
    # no nonzero(): ignored rows add 0 at a clamped index, so nothing waits for the host
    p.scatter_add_(1, target.clamp_min(0).unsqueeze(1), -g.unsqueeze(1))
    return p


_ce_grad._memfit_in_place = True  # writes over its first argument: the memory model counts no new buffer


def _cross_entropy_grad_in_place(g: torch.fx.GraphModule) -> int:
    """Rewrite ``_log_softmax -> nll_loss_backward -> _log_softmax_backward_data`` of a chunk's VJP into
    one in-place pass over the log-probabilities (as Liger's fused linear cross-entropy does by hand):
    the traced form holds three ``[chunk, vocab]`` buffers at once (log-probs, the one-hot gradient, the
    result) and makes four passes; this holds one. Only for an unweighted, summed loss over 2-D
    log-probs that nothing else reads afterwards. Returns how many sites were rewritten."""
    done = 0
    for bwd in list(g.graph.nodes):
        if bwd.target is not aten._log_softmax_backward_data.default:
            continue
        gl, logp = bwd.args[0], bwd.args[1]
        if gl.target is not aten.nll_loss_backward.default or logp.target is not aten._log_softmax.default:
            continue
        grad, self_, target, weight, reduction, ignore_index, _ = gl.args
        order = {n: i for i, n in enumerate(g.graph.nodes)}
        late = [u for u in logp.users if order[u] > order[bwd]]
        if self_ is not logp or weight is not None or reduction != 2 or len(gl.users) != 1 or late \
                or logp.meta["val"].dim() != 2 or bwd.args[2] not in (1, -1):
            continue
        with g.graph.inserting_before(bwd):
            new = g.graph.call_function(_ce_grad, (logp, target, grad, ignore_index))
        new.meta = dict(bwd.meta)
        bwd.replace_all_uses_with(new)
        g.graph.erase_node(bwd)
        g.graph.erase_node(gl)
        done += 1
    if done:
        g.graph.lint()
    return done


def _accumulate_in_place(g: torch.fx.GraphModule, positions: list[int]) -> int:
    """Make the chunk graph add the gradients at ``positions`` of its outputs into accumulators it takes
    as extra inputs, in place (``addmm_`` for a weight gradient ``mm``): a per-chunk ``[vocab, d]``
    gradient and the add after it cost as much as the chunk's matmul (measured: 256 chunks of a 32k x 128
    head took 4.8x the unchunked step with out-of-place sums). Returns the bytes no longer allocated."""
    out = next(n for n in g.graph.nodes if n.op == "output")
    outs = list(out.args[0])
    last_ph = [n for n in g.graph.nodes if n.op == "placeholder"][-1]
    saved = 0
    cursor = last_ph
    for k, pos in enumerate(positions):
        node = outs[pos]
        with g.graph.inserting_after(cursor):
            acc = g.graph.placeholder(f"acc_{k}")
        cursor = acc
        v = node.meta.get("val")
        acc.meta["val"] = v
        saved += v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 0
        src, transposed = node, False
        if node.target is aten.t.default and len(node.args[0].users) == 1:
            src, transposed = node.args[0], True
        if src.target is aten.mm.default and len(src.users) == 1:
            target = acc
            if transposed:
                with g.graph.inserting_after(node):
                    target = g.graph.call_function(aten.t.default, (acc,))
            with g.graph.inserting_after(target if transposed else node):
                new = g.graph.call_function(aten.addmm_.default, (target, *src.args))
        else:
            with g.graph.inserting_after(node):
                new = g.graph.call_function(aten.add_.Tensor, (acc, node))
        outs[pos] = new
    out.args = (tuple(outs),)
    g.graph.eliminate_dead_code()
    g.graph.lint()
    return saved


def _run_chunked(n, args, kwargs, seq, c):
    """Run one region op on a chunk: shape arguments follow the chunk; mean-type reductions become sums."""
    t = n.target
    lay = n.meta.get("memfit_tok")
    if t in (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default) and isinstance(lay, Tok):
        shape = lay.chunk_shape(n.meta["val"].shape, seq, c)
        if t is aten.expand.default:
            return t(args[0], shape)
        # a chunk of an input is a strided slice: a view the whole tensor allowed may need a copy now
        return aten.reshape.default(args[0], shape)
    if n.meta.get("memfit_attn"):
        q, k, v = args[:3]
        return _chunk_attention(q, k, v, kwargs.get("attn_mask"), kwargs.get("scale"), n.meta["memfit_attn"])
    if n.meta.get("memfit_reduce") is None:
        return args[0][args[1]] if t is operator.getitem else t(*args, **kwargs)
    # a token reduction: each chunk gives its partial sum
    if t is aten.nll_loss_forward.default:
        a = list(args)
        a[3] = 2  # sum; the mean divides by the total weight after the last chunk
        return t(*a, **kwargs)
    if t is aten.mean.dim:
        return aten.sum.dim_IntList(*args, **kwargs)
    if t is aten.mean.default:
        return aten.sum.default(*args, **kwargs)
    if t is operator.getitem:
        return args[0][args[1]]
    return t(*args, **kwargs)


def _chunk_attention(q, k, v, mask, scale, mode):
    """Attention of a query chunk. ``"prefix"``: against the keys and values of its prefix — query row
    i of the chunk is token ``e - c + i`` and sees keys ``0 .. e - c + i`` (lower-right alignment;
    ``is_causal`` would align top-left when the lengths differ); with no mask the additive mask is the
    ``chunk x prefix`` lower triangle, with a (provably causal) mask its rows for the chunk, cut to the
    prefix. ``"whole"``: against all keys, with the mask's rows for the chunk. Never a ``T x T`` mask of
    our own. Exact: same kernel, same keys and mask entries per row."""
    c, e = q.shape[-2], k.shape[-2]
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    if mode == "prefix":
        if mask is None:
            allowed = torch.ones(c, e, dtype=torch.bool, device=q.device).tril(e - c)
            mask = torch.zeros(c, e, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
        elif mask.shape[-1] not in (1, e):
            mask = mask.narrow(-1, 0, e)  # the keys after the chunk: ruled out by the mask itself
    return aten._scaled_dot_product_flash_attention_for_cpu.default(q, k, v, 0.0, False, attn_mask=mask, scale=scale)


# -- custom ops ----------------------------------------------------------------------------------------
@torch.library.custom_op("memfit::stream", mutates_args=())
def stream(key: str, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return REGISTRY[key].run_forward(xs)


@stream.register_fake
def _stream_fake(key, xs):
    r = REGISTRY[key]
    outs = [xs[0].new_empty_strided(shape, stride, dtype=dtype) for shape, dtype, stride in r.out_meta]
    if r.plan.grad_in_forward:
        outs += [torch.empty_like(x) for x, need in zip(xs, r.needs) if need]
    return outs


@torch.library.custom_op("memfit::stream_backward", mutates_args=())
def stream_backward(key: str, xs: list[torch.Tensor], outs: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    return REGISTRY[key].run_backward(xs, outs, grads)


@stream_backward.register_fake
def _stream_backward_fake(key, xs, outs, grads):
    r = REGISTRY[key]
    return [torch.empty_like(x) for x, need in zip(xs, r.needs) if need]


def _setup(ctx, inputs, output):
    key, xs = inputs
    r = REGISTRY[key]
    ctx.key = key
    n_out = len(r.out_meta)
    if r.plan.grad_in_forward:
        ctx.save_for_backward(*output[n_out:])
    else:
        small = [o for o, m in zip(output[:n_out], r.outputs) if m[0] == "acc"]
        ctx.save_for_backward(*xs, *small)
        ctx.n_in = len(xs)
    ctx.n_xs = len(xs)


def _backward(ctx, grads):
    r = REGISTRY[ctx.key]
    saved = ctx.saved_tensors
    n_out = len(r.out_meta)
    grads = list(grads)[:n_out]
    if r.plan.grad_in_forward:
        j = next(i for i, m in enumerate(r.outputs) if m[0] == "acc" and r._acc_diff[r.accs[m[1]].node] and m[2] == 0)
        g = grads[j]
        it = iter(saved)
        out = [g * next(it) if need else None for need in r.needs]
        return None, out
    xs, small = list(saved[: ctx.n_in]), list(saved[ctx.n_in :])
    full = [torch.zeros(shape, dtype=dtype, device=xs[0].device) if g is None else g
            for g, (shape, dtype, _) in zip(grads, r.out_meta)]
    got = iter(stream_backward(ctx.key, xs, small, full))
    return None, [next(got) if need else None for need in r.needs]


stream.register_autograd(_backward, setup_context=_setup)











# -- the rewrite ---------------------------------------------------------------------------------------
def _build(gm: torch.fx.GraphModule, rp: RegionPlan, seq: int, need: set, layouts: dict, by: dict) -> _Region:
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
            accs.append(_Acc(node.name, kind, count, out0.dtype))
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
    region = _Region(
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


def apply(gm: torch.fx.GraphModule, plan: StreamPlan, need: set, layouts: dict) -> list[_Region]:
    """Replace each region of ``plan`` in ``gm`` (an ATen graph from :func:`to_aten`) by one stream op."""
    by = {n.name: n for n in gm.graph.nodes}
    made = []
    for rp in plan.regions:
        region = _build(gm, rp, plan.seq_len, need, layouts, by)
        region.prepare()
        key = f"r{next(_keys)}"
        REGISTRY[key] = region
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


def _scratch(node) -> int:
    r = REGISTRY.get(node.args[0])
    if r is None:
        return 0
    return r.scratch_bwd if node.target is torch.ops.memfit.stream_backward.default else r.scratch_fwd


def _time(node, profile) -> float:
    r = REGISTRY.get(node.args[0])
    if r is None:
        return 0.0
    return r.time(profile, backward=node.target is torch.ops.memfit.stream_backward.default)


def _register_models() -> None:
    from memfit.planner.cost import EXTERNAL_TIME
    from memfit.planner.memory import SCRATCH

    for op in (torch.ops.memfit.stream.default, torch.ops.memfit.stream_backward.default):
        SCRATCH[op] = _scratch
        EXTERNAL_TIME[op] = _time


_register_models()
