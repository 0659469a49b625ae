"""The runtime of a streamed region: the ``memfit::stream`` and ``memfit::stream_backward`` custom ops,
the :class:`Region` each call runs, and the models the planner prices those ops with.

:mod:`memfit.passes.stream` decides nothing here: it builds a :class:`Region` from a
:class:`~memfit.planner.stream.RegionPlan`, :func:`register`\\ s it and puts
``memfit::stream(key, inputs)`` in the graph. What happens when that op runs lives here, beside the
few-bit kernels, because it is a kernel in every sense that matters to the rest of memfit: an opaque
op that AOTAutograd, Inductor and the memory model cannot see into.

* ``memfit::stream(key, xs)`` runs the region chunk by chunk along the sequence and assembles its
  outputs; its autograd formula is ``memfit::stream_backward``, which runs the chunks' VJPs. Both are
  opaque, so the forward saves only the region's inputs and the chunks really run one after another.
* Each chunk runs two small ATen graphs traced at compile time (:meth:`Region.prepare`): ``forward(c)``
  and its VJP ``backward(c)`` (or ``fwdbwd(c)`` when the backward runs in the forward,
  ``grad_in_forward``), so no autograd runs at step time.
* :data:`OP_MODELS`: what the op costs, for the planner's memory and cost models (see
  :mod:`memfit.kernels`): its chunk graphs' simulated peak (scratch memory, allocated and freed inside
  the op) and their roofline time times the chunk count.

**The registry's lifetime.** A compiled graph holds only the region's key, a string: the op's schema
takes no Python object, and the code Inductor generates for the graph (``memfit::stream("r3", ...)``)
keeps no reference to the FX graph, the backend or anything else memfit could tie the region's life to.
So :data:`REGISTRY` holds every region strongly for the life of the process: a region dropped while a
compiled function that names it can still run would fail that step with a ``KeyError`` (and the
memory model, which looks regions up by the same key, would silently count no scratch). Regions are
made at compile time only (one per streamed region per compile attempt); each holds its traced chunk
graphs and, when fused, their Inductor-compiled code. Whoever knows that no compiled code names a key
any more may :func:`release` it: the compiler's searches do, for every streamed graph they drop (chunk
counts over the budget, a streamed compile not kept; ``memfit.compiler.search.release_streamed``).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch._subclasses.fake_tensor import FakeTensorMode

from memfit.kernels import OpModel
from memfit.planner.stream import MEAN, NLL, SUM, RegionPlan, Tok

aten = torch.ops.aten

#: key -> Region, for the custom ops (a compiled graph holds only the key). Process lifetime: see the
#: module docstring for why the entries cannot be weak.
REGISTRY: dict[str, "Region"] = {}
_keys = itertools.count()


def register(region: "Region") -> str:
    """Make ``region`` callable by ``memfit::stream``: returns the key the op is to be called with."""
    key = f"r{next(_keys)}"
    REGISTRY[key] = region
    return key


def release(keys) -> None:
    """Forget the regions of ``keys``. Only for keys no graph or compiled function will run again (an
    abandoned compile attempt's ``gm.meta["memfit_stream_keys"]``): running such a key raises ``KeyError``."""
    for key in keys:
        REGISTRY.pop(key, None)


#: Structure -> the first region fully prepared with it, while a stream search prices its probes
#: (:func:`twin_pricing`); None otherwise.
_TWINS: dict | None = None


@contextlib.contextmanager
def twin_pricing():
    """Inside, a region whose structure a prepared region already has (a transformer's repeated layers) is
    priced from it, its own chunk graphs not traced: its scratch and time are the twin's. For a stream
    search's probes, which are priced and dropped: the Llama-3-8B config's every-region probes traced 33
    regions' chunk graphs each, 32 of them one layer's. A region so priced cannot run: the compile that
    keeps it calls :meth:`Region.ensure_prepared` (``memfit.compiler.search.prepare_streamed``) first."""
    global _TWINS
    outer = _TWINS
    _TWINS = {} if outer is None else outer
    try:
        yield
    finally:
        _TWINS = outer


# -- one region at run time ----------------------------------------------------------------------------
@dataclass
class Acc:
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
class Region:
    """One streamed region, as the custom ops run it: its body, how its inputs and outputs are sliced
    and assembled, and its chunk graphs (traced at compile time, run at step time). Built by
    :func:`memfit.passes.stream.apply`, which also sets the per-node lookups (``_nodes``, ``_tok_names``,
    ``_tok_diff``, ``_acc_diff``, ``_xs_meta``, ``_out_nodes``) it reads from the region's graph."""

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
    _times: dict = field(default_factory=dict, repr=False)
    """(profile, backward) -> :meth:`time`."""
    twin: "Region | None" = field(default=None, repr=False)
    """The prepared region of the same structure this one is priced from (:func:`twin_pricing`): its chunk
    graphs are not traced until :meth:`ensure_prepared`."""

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
        ``autograd.grad`` cannot be traced. Their simulated peaks are the op's scratch memory. Inside
        :func:`twin_pricing`, a region of a structure already prepared takes that one's figures instead."""
        if _TWINS is not None:
            sig = self.signature()
            twin = _TWINS.get(sig)
            if twin is not None:
                self.twin = twin
                self.scratch_fwd, self.scratch_bwd = twin.scratch_fwd, twin.scratch_bwd
                return
            self._trace_all()
            _TWINS[sig] = self
            return
        self._trace_all()

    def ensure_prepared(self) -> None:
        """Give a region priced from a twin chunk graphs of its own before it may run: copies of the twin's
        (the same graphs: equal signatures trace equal graphs), traced afresh only where the body reads
        an attribute of its own (a constant the twin's graphs would hold its value of). Tracing them again
        took 10 s of the Llama-3-8B config's final compile (32 layers in 8 chunks); copying them, 0.8 s."""
        from memfit.planner.graphs import copy_graph_module

        twin, self.twin = self.twin, None
        if twin is None:
            return
        if not any(n.op == "get_attr" for n in self.body.graph.nodes):
            for mine, theirs in ((self.fwd, twin.fwd), (self.bwd, twin.bwd), (self.fwdbwd, twin.fwdbwd)):
                for key, g in theirs.items():
                    mine.setdefault(key, copy_graph_module(g))  # not shared: Inductor compiles each region's own
        self._trace_all()  # whatever the twin did not trace (nothing, when it was fully prepared)

    def signature(self) -> tuple:
        """The region's structure, without its node names: two regions with equal signatures trace to the
        same chunk graphs (up to names), so they have the same scratch and time."""
        nodes = list(self.body.graph.nodes)
        index = {n: i for i, n in enumerate(nodes)}
        by_name = {n.name: i for i, n in enumerate(nodes)}

        def norm(a):
            return torch.fx.node.map_aggregate(a, lambda x: ("%", index[x]) if isinstance(x, torch.fx.Node) else x)

        def val(v):
            if isinstance(v, torch.Tensor):
                return (tuple(v.shape), v.dtype, tuple(v.stride()), v.device.type)
            if isinstance(v, (list, tuple)):
                return tuple(val(x) for x in v)
            return repr(v)

        body = tuple((n.op, "" if n.op == "placeholder" else str(n.target), repr(norm(n.args)), repr(norm(n.kwargs)),
                      *(repr(n.meta.get(k)) for k in ("memfit_tok", "memfit_attn", "memfit_reduce")),
                      val(n.meta.get("val")))
                     for n in nodes)
        return (self.seq, self.plan.chunks, self.plan.fused, self.plan.grad_in_forward, repr(self.input_layouts),
                self.needs, tuple(self._xs_meta), repr(self.out_meta), repr(self.outputs), repr(self.tok_outputs),
                tuple(by_name.get(t, t) for t in self._tok_names), tuple(self._tok_diff[t] for t in self._tok_names),
                tuple((by_name.get(a.node, a.node), a.kind, a.count, a.dtype, self._acc_diff[a.node])
                      for a in self.accs),
                body)

    def _trace_all(self) -> None:
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
        """Time of the op: its chunk graphs' roofline, once per chunk, scaled by the profile's measured
        ``stream_factor`` (compiled or eager chunk graphs), plus the runtime's fixed cost per chunk:
        ``stream_chunk_s`` per input and non-pointwise kernel of a compiled chunk graph, ``stream_node_s``
        per node of an eager one (see ``memfit.planner.cost.CPU_STREAM_FACTOR``)."""
        from memfit.planner.cost import is_view, node_time

        if self.twin is not None:
            return self.twin.time(profile, backward)
        key = (profile, backward)
        if key not in self._times:  # the planner asks once per probe of its search; the graphs do not change
            table = self.bwd if backward else (self.fwdbwd if self.plan.grad_in_forward else self.fwd)
            factor = profile.stream_factor[0 if self.plan.fused else 1]
            # chunks of one length (and end, where it matters) run the same graph: priced once each (the
            # Llama-3-8B config's 33 regions in 512 chunks were 512 pricings of one graph per region,
            # minutes of a plan)
            counts = collections.Counter(self.chunk_key(s, e) for s, e in self.ranges())
            total = 0.0
            for chunk, count in counts.items():
                g = table[chunk].graph
                nodes = [n for n in g.nodes if n.op == "call_function"]
                if self.plan.fused:
                    # Inductor fuses the pointwise ops: the runtime's cost per chunk follows the kernels that
                    # stay (non-pointwise ops) and the inputs it slices, not the node count (an HF Llama's
                    # chunk graphs have 3x a GPT's nodes, 1.06x its kernels and inputs, and cost 1.13x per chunk)
                    work = [n for n in nodes if not is_view(n)]
                    kernels = sum(1 for n in work if torch.Tag.pointwise not in getattr(n.target, "tags", ()))
                    inputs = sum(1 for n in g.nodes if n.op == "placeholder")
                    one = factor * sum(max(node_time(n, profile) - profile.launch_s, 0.0) for n in work)
                    one += profile.stream_chunk_s * (kernels + inputs)
                else:  # eager chunk graphs: every node is an op dispatched from Python
                    one = factor * sum(node_time(n, profile) for n in nodes) + profile.stream_node_s * len(nodes)
                total += count * one
            self._times[key] = total
        return self._times[key]

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

    def _check_prepared(self) -> None:
        if self.twin is not None:
            raise RuntimeError(f"memfit stream region {self.plan.name} was priced from a twin and never prepared: "
                               "call Region.ensure_prepared() at compile time (a memfit bug; please report it)")

    def run_forward(self, xs):
        self._check_prepared()
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
        self._check_prepared()
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
            # the planner prices these nodes from their values (an addmm_ is a weight gradient's GEMM: priced
            # as nothing, a streamed 2-layer GPT's predicted step missed 40% of its matmul FLOPs)
            target.meta["val"] = src.meta.get("val")
            new.meta["val"] = src.meta.get("val")
        else:
            with g.graph.inserting_after(node):
                new = g.graph.call_function(aten.add_.Tensor, (acc, node))
            new.meta["val"] = node.meta.get("val")
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


def _scaled(g: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``g * grad`` (a gradient computed in the forward, scaled by the loss's incoming gradient) in
    ``grad``'s own memory layout. A weight's gradient computed in the forward is the gradient of the
    weight's transpose (what the matmul reads); multiplied as it is, Inductor wrote the product
    contiguous and then copied it into the weight's layout, with both allocated at once, and the
    products of every such weight were allocated together in one fused kernel: 2.1 MiB over the plan
    on a streamed HF Llama. Multiplied in the dense order of its strides, the product is already the
    weight's gradient, and Inductor writes it over the forward's buffer."""
    order = sorted(range(grad.dim()), key=lambda d: -grad.stride(d))
    if grad.dim() < 2 or order == list(range(grad.dim())) or not grad.permute(order).is_contiguous():
        return g * grad
    back = sorted(range(grad.dim()), key=lambda d: order[d])
    return (g * grad.permute(order)).permute(back)


def _backward(ctx, grads):
    r = REGISTRY[ctx.key]
    saved = ctx.saved_tensors
    n_out = len(r.out_meta)
    grads = list(grads)[:n_out]
    if r.plan.grad_in_forward:
        j = next(i for i, m in enumerate(r.outputs) if m[0] == "acc" and r._acc_diff[r.accs[m[1]].node] and m[2] == 0)
        g = grads[j]
        it = iter(saved)
        out = [_scaled(g, next(it)) if need else None for need in r.needs]
        return None, out
    xs, small = list(saved[: ctx.n_in]), list(saved[ctx.n_in :])
    full = [torch.zeros(shape, dtype=dtype, device=xs[0].device) if g is None else g
            for g, (shape, dtype, _) in zip(grads, r.out_meta)]
    got = iter(stream_backward(ctx.key, xs, small, full))
    return None, [next(got) if need else None for need in r.needs]


stream.register_autograd(_backward, setup_context=_setup)


# -- the op's models, for the planner ------------------------------------------------------------------
def _scratch(node, strides=None) -> int:
    """Bytes the op allocates and frees inside itself: the peak of one of its chunk graphs (the same
    whatever strides Inductor gave the op's inputs: the chunk graphs were traced for the FX values)."""
    r = REGISTRY.get(node.args[0])
    if r is None:
        return 0
    chunks = r.scratch_bwd if node.target is torch.ops.memfit.stream_backward.default else r.scratch_fwd
    return chunks + _conform_bytes(r, node, strides)


def _conform_bytes(r: "Region", node, strides=None) -> int:
    """Bytes of the copies :meth:`Region.conform` makes, held while the op runs: each input whose strides
    (the graph's value, or as Inductor compiled it: ``strides``) differ from those the chunk graphs were
    traced for. The stream pass traces its own ATen graph, and a value's layout there can differ from
    AOTAutograd's: under HF's gradient checkpointing a GPT-2's attention output, redrawn through
    AOTAutograd's RNG op, is contiguous in the step's graph and head-transposed in the region's trace,
    and the [2, 4, 256, 16] copy (128 KiB) was the gap between the predicted and measured peak."""
    xs = node.args[1] if len(node.args) > 1 and isinstance(node.args[1], (list, tuple)) else ()
    total = 0
    for i, (a, (shape, dtype, _, stride)) in enumerate(zip(xs, r._xs_meta)):
        v = a.meta.get("val") if isinstance(a, torch.fx.Node) else None
        if not isinstance(v, torch.Tensor) or not v.dim():
            continue
        given = strides[i] if strides is not None and i < len(strides) and strides[i] is not None else v.stride()
        if tuple(given) != tuple(stride):
            size = 1 + sum((d - 1) * st for d, st in zip(shape, stride) if d > 0) if all(d > 0 for d in shape) else 0
            total += size * dtype.itemsize
    return total


def _time(node, profile) -> float:
    """Roofline seconds of the op: its chunk graphs, once per chunk (not the op's own bytes, which the
    roofline would count as one pass over its inputs and outputs)."""
    r = REGISTRY.get(node.args[0])
    if r is None:
        return 0.0
    return r.time(profile, backward=node.target is torch.ops.memfit.stream_backward.default)


#: The planner's models of the ops above (merged by :func:`memfit.kernels.op_models`).
OP_MODELS = {
    torch.ops.memfit.stream.default: OpModel(scratch=_scratch, time=_time),
    torch.ops.memfit.stream_backward.default: OpModel(scratch=_scratch, time=_time),
}
