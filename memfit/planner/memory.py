"""The graph memory model: sizes, lifetimes and the peak of one training step.

A step is the forward graphs in order, then their backward graphs in reverse order (the order
autograd runs them). Memory is modelled per *buffer* (a storage), not per FX value: a view, a
``getitem`` of a multi-output op, or an in-place ``copy_`` into an input adds no bytes and keeps its
base alive. That matters: AOTAutograd often saves a ``view`` or ``t`` of an intermediate, and the
whole base stays allocated until the view's last use in the backward.

What is counted, above what was resident before the step (parameters, inputs, buffers):

* forward intermediates, from the node that makes them to their last use in the forward;
* saved activations (forward outputs the backward reads), until their last use in the backward —
  the backward is called with a boxed argument list that it clears, so a saved tensor is freed
  as soon as the backward no longer needs it (Inductor does the same);
* the forward's user outputs (the loss the caller holds), until the end of the step;
* tangents (the incoming gradients) from the start of the backward;
* gradients (the backward's outputs), from the node that makes them to the end of the step
  (they become ``.grad``).

Under Inductor two models exist. The planner's (``fused=True``) estimates from the FX graph which values
Inductor fuses away and where it computes ``addmm``; it is fast enough to evaluate every candidate
plan. Once Inductor has compiled a graph, its own buffer plan is replayed instead
(``buffer_plans``, see :mod:`memfit.planner.inductor_plan`): that is the step as it will run, reuse
and in-place writes included, and what the budget is checked against.

The timeline holds, for every node, the bytes live once its outputs are allocated (the peak can
only be reached there) and once the buffers it was the last user of are freed. On CPU the
allocator is ``malloc`` (no rounding); on CUDA the caching allocator rounds blocks up to 512 bytes,
which ``granularity`` models.
"""

from __future__ import annotations

import operator
import os
import re
from dataclasses import dataclass, field

import torch
import torch.fx

from memfit.planner.cost import is_view, node_vals, resolve_op_models, tensor_bytes

RESIDENT = "resident"  # kinds of buffers
ACTIVATION = "activation"
SAVED = "saved"
OUTPUT = "output"
TANGENT = "tangent"
GRAD = "grad"
TEMP = "temp"


@dataclass(frozen=True)
class GraphPair:
    """One compiled training graph: its forward and backward halves after partitioning."""

    forward: torch.fx.GraphModule
    backward: torch.fx.GraphModule | None
    num_user_outputs: int
    """How many of the forward's outputs go to the user; the rest are saved for the backward."""
    name: str = "g0"
    param_inputs: tuple[bool, ...] | None = None
    """Per forward input, whether it is a parameter; ``None``: unknown. When a step has several
    graphs (graph breaks), the gradient a later graph returns for a non-parameter input is the
    incoming gradient (tangent) of an earlier graph: it is counted once, and freed when that
    earlier backward is done, instead of being a gradient that lives to the end of the step."""


@dataclass
class Buffer:
    """One allocation: made by ``producer`` in ``graph``; freed after step ``free_step``."""

    id: int
    graph: str
    producer: str
    nbytes: int
    kind: str
    alloc_step: int
    free_step: int = -1
    saved_as: list = field(default_factory=list)
    module: str = ""
    source: str = ""
    last_use: int = -1
    """Last step of the buffer's own graph(s) that reads it (any alias of it)."""
    pinned: int = -1
    """Step it must live to regardless of uses (saved for the backward, returned to the user)."""

    def live_at(self, step: int) -> bool:
        return self.alloc_step <= step <= self.free_step


@dataclass(frozen=True)
class TimelinePoint:
    step: int
    graph: str
    node: str
    live_bytes: int
    """Bytes live once this node's outputs exist (before anything is freed)."""
    after_free: int
    """Bytes live after the buffers whose last use was this node are freed."""


@dataclass
class MemoryModel:
    buffers: list[Buffer]
    timeline: list[TimelinePoint]
    peak_bytes: int
    peak_step: int
    unmatched: list[str] = field(default_factory=list)
    """Backward inputs that match no saved forward output by name (counted as made at its start)."""

    @property
    def peak_point(self) -> TimelinePoint | None:
        return self.timeline[self.peak_step] if self.timeline else None

    @property
    def saved(self) -> list[Buffer]:
        """Saved-activation buffers (resident ones, e.g. a saved weight, are not counted), largest first."""
        return sorted((b for b in self.buffers if b.kind == SAVED), key=lambda b: -b.nbytes)

    @property
    def saved_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers if b.kind == SAVED)

    def live_at(self, step: int) -> list[Buffer]:
        return [b for b in self.buffers if b.nbytes and b.live_at(step)]

    def dominant_saved(self, k: int = 10) -> list[Buffer]:
        """The saved activations live at the peak, largest first: what a plan has to attack."""
        live = self.live_at(self.peak_step)
        return sorted((b for b in live if b.kind == SAVED), key=lambda b: -b.nbytes)[:k]


def source_of(node: torch.fx.Node) -> tuple[str, str]:
    """(module path, ``file:line code``) from the node's metadata, as far as it carries them."""
    module = ""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        module = _clean_module_path(path)
    source = ""
    trace = node.meta.get("stack_trace")
    if trace:
        frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', trace)
        if frames:
            f, line, _fn, code = frames[-1]
            source = f"{_short_path(f)}:{line} {code.strip()}"
    return module, source


def _short_path(path: str) -> str:
    """``examples/gpt.py`` for files under the working directory, ``transformers/...`` for packages."""
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def _clean_module_path(path: str) -> str:
    # Dynamo names modules like "L['self'].layers[0].mlp" or "L__self___layers_0_mlp".
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"^L\['(\w+)'\]", r"\1", path)
    path = re.sub(r"\._modules\['(\w+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.lstrip(".")


class _Sim:
    def __init__(self, granularity: int, fused: set[torch.fx.Node], op_models=None):
        self.g = max(1, granularity)
        self.fused = fused
        self.op_models = resolve_op_models(op_models)
        """``{op: OpModel}``: the ops with a ``scratch`` model allocate that much inside themselves."""
        self.buffers: list[Buffer] = []
        self.schedule: list[tuple[str, str]] = []  # (graph, node) per step
        self.unmatched: list[str] = []  # backward inputs not matched to a saved forward output
        self.step = -1
        self.moved: dict[torch.fx.Node, torch.fx.Node] = {}  # node -> the node Inductor computes it at
        self.inductor = False  # simulating graphs Inductor compiles (see scratch_model)

    def size(self, t) -> int:
        n = tensor_bytes(t)
        return -(-n // self.g) * self.g if n else 0

    def scratch_model(self, node: torch.fx.Node):
        """``f(node) -> bytes`` of an op that allocates and frees memory inside itself, else ``None``.

        Under Inductor, not for the ATen ops it calls as extern kernels (``OpModel.inside_plans=False``):
        it lays their operands out anew (convolutions channels-last: a UNet's convolution scratch is a
        fraction of what the FX values' strides give, whose 1.59 MiB floor refused a budget that plain
        ``torch.compile`` meets at 1.16 MiB). The replay of the compiled plan adds their scratch with
        the strides Inductor chose."""
        model = self.op_models.get(node.target) if node.op == "call_function" else None
        if model is None or (self.inductor and not model.inside_plans):
            return None
        return model.scratch

    def new(self, graph: str, node: torch.fx.Node, nbytes: int, kind: str) -> Buffer:
        module, source = source_of(node)
        b = Buffer(len(self.buffers), graph, node.name, nbytes, kind, self.step, module=module, source=source)
        self.buffers.append(b)
        return b


def _first_tensor_input(node: torch.fx.Node) -> torch.fx.Node | None:
    for a in node.args:
        if isinstance(a, torch.fx.Node):
            return a
        if isinstance(a, (list, tuple)):
            for x in a:
                if isinstance(x, torch.fx.Node):
                    return x
    return None


def simulate(
    pairs: list[GraphPair],
    granularity: int = 1,
    fused: bool = False,
    buffer_plans: dict | None = None,
    op_models=None,
) -> MemoryModel:
    """Simulate the step (forwards in order, then backwards in reverse) and return the model.

    ``fused=True`` models a fusing compiler (Inductor): values that :func:`fused_away` says live only
    inside a fused kernel take no memory.

    ``buffer_plans``: ``{"g0.fw": BufferPlan, ...}``, the buffer plans Inductor made for graphs it compiled
    (see :mod:`memfit.planner.inductor_plan`); such a graph is replayed from its plan (every
    allocation, hand-over and free Inductor generated code for) instead of estimated from its nodes.

    ``op_models``: ``{op: OpModel}`` of opaque ops that allocate memory inside themselves (see
    :mod:`memfit.kernels`); ``None``: the kernels' table.

    Three steps: create every buffer while walking the graphs in step order (:func:`_walk_step`), set
    each buffer's lifetime from its uses and role (:func:`_set_lifetimes`), and replay the allocations
    and frees into the timeline (:func:`_timeline`).
    """
    away, moved = _inductor_rewrites(pairs) if fused else (set(), {})
    sim = _Sim(granularity, away, op_models)
    sim.moved = moved
    sim.inductor = fused
    walk = _walk_step(sim, pairs, buffer_plans or {})
    end = sim.step
    _set_lifetimes(sim, pairs, walk, end)
    timeline = _timeline(sim, end)
    peak_step = max(range(len(timeline)), key=lambda i: timeline[i].live_bytes) if timeline else 0
    peak = timeline[peak_step].live_bytes if timeline else 0
    return MemoryModel(sim.buffers, timeline, peak, peak_step, unmatched=sim.unmatched)


def _inductor_rewrites(pairs: list[GraphPair]) -> tuple[set, dict]:
    """What a fusing compiler changes in the graphs' memory: the nodes it never writes out (fused
    pointwise ops, and ``mm``\ s it folds into an ``addmm``), and ``{mm: add}`` for those ``mm``\ s,
    whose inputs it reads at the ``add`` (see :func:`addmm_rewrites`, :func:`fused_away`)."""
    away: set[torch.fx.Node] = set()
    moved: dict[torch.fx.Node, torch.fx.Node] = {}
    for p in pairs:
        for gm in (p.forward, p.backward):
            if gm is not None:
                addmm = addmm_rewrites(gm)
                moved.update(addmm)
                away |= fused_away(gm, extern=frozenset(addmm.values())) | set(addmm)
    return away, moved


@dataclass
class _Walk:
    """What walking the step's graphs found, for :func:`_set_lifetimes`."""

    fw_info: list
    """Per pair: (buffers by node name, output args, first step) of its forward."""
    bw_info: dict
    """Pair index -> the same for its backward (pairs without a backward are missing)."""
    bw_last: dict
    """Pair index -> the last step of its backward."""
    linked: set
    """Ids of handed-back gradients matched to the tangent that receives them."""


def _walk_step(sim: _Sim, pairs: list[GraphPair], buffer_plans: dict) -> _Walk:
    """Walk the graphs in the order the step runs them (forwards, then backwards in reverse), creating
    their buffers and recording each one's last use in its own graph. A backward's placeholders are
    matched to the forward outputs it saved (by name) and to the gradients a later graph's backward
    handed back (:func:`_handed_tangents`)."""

    def collect(gm, graph, placeholder_bufs, new_kind, free_tangents=False):
        # the replayed plan holds every kernel's scratch where an op model knows it (stream ops too)
        plan = buffer_plans.get(graph)
        if plan is not None:
            return _collect_planned(sim, gm, graph, plan, placeholder_bufs, new_kind, free_tangents)
        return _collect(sim, gm, graph, placeholder_bufs, new_kind, free_tangents)

    fw_info = [collect(p.forward, f"{p.name}.fw", None, ACTIVATION) for p in pairs]
    bw_info: dict = {}
    bw_last: dict[int, int] = {}
    linked: set[int] = set()
    for k in reversed(range(len(pairs))):
        p = pairs[k]
        if p.backward is None:
            continue
        fw_bufs, fw_out, _ = fw_info[k]
        # map saved forward outputs to backward placeholders by name
        saved_map = {}
        for j, a in enumerate(fw_out):
            if isinstance(a, torch.fx.Node) and j >= p.num_user_outputs:
                saved_map[a.name] = fw_bufs.get(a.name, [None])
        saved_map.update(_handed_tangents(p, pairs[k + 1] if k + 1 < len(pairs) else None, bw_info.get(k + 1), linked))
        bw_info[k] = collect(p.backward, f"{p.name}.bw", saved_map, TEMP, free_tangents=k < len(pairs) - 1)
        bw_last[k] = sim.step
    return _Walk(fw_info, bw_info, bw_last, linked)


def _set_lifetimes(sim: _Sim, pairs: list[GraphPair], walk: _Walk, end: int) -> None:
    """Set every buffer's kind and free step: a buffer lives to its last local use, extended for saved
    values (to their last use in the backward), user outputs and gradients (to ``end``, the step's last),
    and a gradient handed back to an earlier graph (to the end of that graph's backward)."""
    fw_info, bw_info, bw_last, linked = walk.fw_info, walk.bw_info, walk.bw_last, walk.linked
    for k, p in enumerate(pairs):
        fw_bufs, fw_out, _ = fw_info[k]
        for j, a in enumerate(fw_out):
            if not isinstance(a, torch.fx.Node):
                continue
            for b in fw_bufs.get(a.name, []):
                if b is None or b.kind == RESIDENT:
                    continue
                if j < p.num_user_outputs or k not in bw_info:
                    # Also an output that a graph break handed to the next graph: the caller may hold
                    # it too (an HF model's output object holds the logits the loss graph reads).
                    # Measured on HF GPT-2 (loss behind a graph break) with the output held through
                    # the backward: 15.47 MiB, against 10.73 MiB modelled when the logits died with
                    # the loss graph's backward; 11.47 MiB measured when the caller drops the output.
                    b.kind = OUTPUT
                    b.pinned = end
                else:
                    if b.kind != OUTPUT:
                        b.kind = SAVED
                    b.saved_as.append(a.name)
                    # without a backward use it still lives until the backward starts
                    b.pinned = max(b.pinned, bw_info[k][2])
        if k in bw_info:
            bw_bufs, bw_out, _ = bw_info[k]
            handed_back = k > 0 and k - 1 in bw_last and p.param_inputs is not None
            for i, a in enumerate(bw_out):
                if isinstance(a, torch.fx.Node):
                    for b in bw_bufs.get(a.name, []):
                        if b is None or b.kind == RESIDENT:
                            continue
                        if handed_back and i < len(p.param_inputs) and not p.param_inputs[i]:
                            if b.id not in linked:  # the next backward's tangent, whichever it is
                                b.pinned = max(b.pinned, bw_last[k - 1])
                            continue
                        if b.kind in (TEMP, TANGENT):
                            b.kind = GRAD
                        b.pinned = end
    for b in sim.buffers:
        b.free_step = max(b.last_use, b.pinned, b.alloc_step)


def _timeline(sim: _Sim, end: int) -> list[TimelinePoint]:
    """Replay the buffers' allocations and frees, step by step: the bytes live at each step once its
    outputs exist and once what it last used is freed. Outputs and gradients alive at ``end`` outlive
    the step and are never freed here."""
    allocs: dict[int, int] = {}
    frees: dict[int, int] = {}
    for b in sim.buffers:
        if b.nbytes:
            allocs[b.alloc_step] = allocs.get(b.alloc_step, 0) + b.nbytes
            if b.free_step < end or b.kind not in (OUTPUT, GRAD):  # those outlive the step
                frees[b.free_step] = frees.get(b.free_step, 0) + b.nbytes
    timeline = []
    live = 0
    for step, (graph, name) in enumerate(sim.schedule):
        live += allocs.get(step, 0)
        before = live
        live -= frees.get(step, 0)
        timeline.append(TimelinePoint(step, graph, name, before, live))
    return timeline


def _collect(sim: _Sim, gm, graph: str, placeholder_bufs, new_kind: str, free_tangents: bool = False):
    """Create the buffers of one graph and record, on each buffer, its last use in this graph."""
    bufs: dict[str, list] = {}
    nodes = list(gm.graph.nodes)
    first_step = sim.step + 1
    pos = {n: first_step + i for i, n in enumerate(nodes)}
    output_args: list = []
    for n in nodes:
        sim.step += 1
        sim.schedule.append((graph, n.name))
        if n.op == "placeholder":
            bufs[n.name] = _placeholder(sim, graph, n, placeholder_bufs, free_tangents)
        elif n.op == "call_function":
            if n.target is operator.getitem and isinstance(n.args[0], torch.fx.Node):
                src = bufs.get(n.args[0].name, [None])
                idx = n.args[1]
                got = src[idx] if isinstance(idx, int) and idx < len(src) else None
                bufs[n.name] = got if isinstance(got, list) else [got]  # a nested tuple: its buffers
            elif is_view(n):
                base = _first_tensor_input(n)
                shared = bufs[base.name][0] if base is not None and base.name in bufs else None
                val = n.meta.get("val")
                # split/chunk/unbind: every piece is a view of the base, so each keeps it alive (only
                # the first did: a GRU cell's saved third chunk let its [16, 48] matmul output die,
                # 12 KiB under the measured peak of a 6-step unrolled cell)
                bufs[n.name] = [shared] * (len(val) if isinstance(val, (list, tuple)) else 1)
            else:
                val = n.meta.get("val") if "val" in n.meta else _rng_hop_value(n)
                vals = list(val) if isinstance(val, (list, tuple)) else [val]
                fused = n in sim.fused

                def buffer(v):
                    if isinstance(v, (list, tuple)):  # an op's tuple inside the value: nested buffers
                        return [buffer(x) for x in v]
                    return sim.new(graph, n, 0 if fused else sim.size(v), new_kind) if isinstance(v, torch.Tensor) else None

                bufs[n.name] = [buffer(v) for v in vals]
                scratch = sim.scratch_model(n)
                if scratch is not None:
                    sim.new(graph, n, scratch(n), TEMP).last_use = sim.step
        elif n.op == "output":
            output_args = list(n.args[0]) if isinstance(n.args[0], (list, tuple)) else [n.args[0]]
        else:  # get_attr: a constant, resident
            bufs[n.name] = [sim.new(graph, n, 0, RESIDENT)]
        for b in _flat(bufs.get(n.name, [])):
            if b is not None:  # used by nobody yet: would die right after it is made
                b.last_use = max(b.last_use, sim.step)
        if n.op != "output":
            use = pos[sim.moved[n]] if n in sim.moved else sim.step  # read where Inductor computes it
            for a in n.all_input_nodes:
                for b in _flat(bufs.get(a.name, [])):
                    if b is not None:
                        b.last_use = max(b.last_use, use)
    return bufs, output_args, first_step


def _flat(bufs: list) -> list:
    """A node's buffers with nested lists (an op's tuple inside a tuple) flattened."""
    if not any(isinstance(b, list) for b in bufs):
        return bufs
    return [x for b in bufs for x in (_flat(b) if isinstance(b, list) else [b])]


#: AOTAutograd's functionalized RNG inside a checkpoint region (``torch.utils.checkpoint``, HF's
#: ``gradient_checkpointing_enable()``; seen with the eager inner compiler): the forward draws through
#: ``run_and_save_rng_state(op, *args)`` -> ``(rng_state, op's outputs)``, the backward redraws the same
#: values through ``run_with_rng_state(rng_state, op, *args)`` -> op's outputs.
_RNG_HOPS = {"run_and_save_rng_state": 1, "run_with_rng_state": 2}


def _rng_hop_value(n: torch.fx.Node):
    """The value of an RNG higher-order op node, which AOTAutograd leaves without ``meta['val']``: the
    op run on the arguments' fake values (its outputs, ``getitem`` of them), the RNG state as the graph's
    ``getitem(node, 0)`` holds it. Without it the dropout a checkpointed HF GPT-2 layer redraws in the
    backward (the attention probabilities, [2, 4, 256, 256] float and its bool mask: 2.5 MiB) counted
    nothing, and a streamed plan measured 11.19 MiB against 9.23 predicted."""
    name = getattr(n.target, "__name__", None) or str(n.target)
    first = _RNG_HOPS.get(name)
    if first is None or n.op != "call_function" or len(n.args) < first:
        return None
    op = n.args[first - 1]
    from torch._guards import detect_fake_mode

    def val(a):
        return a.meta.get("val") if isinstance(a, torch.fx.Node) else a

    args = [val(a) for a in n.args[first:]]
    kwargs = {k: val(a) for k, a in n.kwargs.items()}
    mode = detect_fake_mode([a for a in args if isinstance(a, torch.Tensor)])
    try:
        if mode is None or any(isinstance(a, torch.fx.Node) and "val" not in a.meta for a in n.args[first:]):
            raise ValueError("no fake values for the arguments")
        with mode:
            out = op(*args, **kwargs)
    except Exception:  # noqa: BLE001 - fall back to the values the graph's getitems carry
        users = {u.args[1]: u.meta.get("val") for u in n.users if u.target is operator.getitem}
        return tuple(users.get(i) for i in range(max(users) + 1)) if users else None
    if first == 2:
        return out
    states = [u.meta.get("val") for u in n.users if u.target is operator.getitem and u.args[1] == 0]
    return (states[0] if states else None, out)


def _handed_tangents(p: GraphPair, nxt: GraphPair | None, nxt_bw, linked: set) -> dict:
    """Tangents of ``p``'s backward that are the input gradients the next graph's backward returned.

    A graph break hands an activation to the next graph; that graph's backward returns its gradient,
    which autograd passes to this backward as a tangent. A tangent is linked to the returned gradient
    of the same shape and dtype when exactly one matches, so the gradient dies where this backward
    drops the tangent (not at its end). Unmatched ones stay pinned to the end of this backward."""
    if nxt is None or nxt_bw is None or nxt.param_inputs is None or p.backward is None:
        return {}
    bufs, outs, _ = nxt_bw
    handed = []
    for i, a in enumerate(outs):
        if isinstance(a, torch.fx.Node) and i < len(nxt.param_inputs) and not nxt.param_inputs[i]:
            v = a.meta.get("val")
            got = [b for b in bufs.get(a.name, []) if b is not None and b.kind != RESIDENT]
            if isinstance(v, torch.Tensor) and len(got) == 1:
                handed.append(((tuple(v.shape), v.dtype), got[0]))
    out = {}
    tangents = [n for n in p.backward.graph.nodes if n.op == "placeholder" and n.name.startswith("tangents")]
    for n in tangents:
        v = n.meta.get("val")
        if not isinstance(v, torch.Tensor):
            continue
        key = (tuple(v.shape), v.dtype)
        match = [b for k, b in handed if k == key]
        same = [t for t in tangents if isinstance(t.meta.get("val"), torch.Tensor)
                and (tuple(t.meta["val"].shape), t.meta["val"].dtype) == key]
        if len(match) == 1 and len(same) == 1:
            out[n.name] = [match[0]]
            linked.add(match[0].id)
    return out


def _placeholder(sim: _Sim, graph: str, n: torch.fx.Node, placeholder_bufs, free_tangents: bool) -> list:
    if placeholder_bufs is not None and n.name in placeholder_bufs:
        return placeholder_bufs[n.name]
    if placeholder_bufs is not None and n.name.startswith("tangents"):
        # an incoming gradient, made by autograd just before the backward runs; with
        # free_tangents, a later graph's backward made it (and it is counted there)
        size = (lambda v: 0) if free_tangents else sim.size
        return [sim.new(graph, n, size(v), TANGENT) for v in node_vals(n)] or [None]
    if placeholder_bufs is not None and node_vals(n):
        # handed over by the forward under another name (e.g. the RNG state that
        # functionalized dropout in a checkpoint region saves): counted from the start of
        # the backward, the conservative end of what it can cost
        sim.unmatched.append(n.name)
        return [sim.new(graph, n, sim.size(v), TANGENT) for v in node_vals(n)]
    return [sim.new(graph, n, 0, RESIDENT) for _ in node_vals(n)] or [None]


def _collect_planned(sim: _Sim, gm, graph: str, plan, placeholder_bufs, new_kind: str, free_tangents: bool):
    """:func:`_collect` for a graph Inductor compiled: its buffers are the ones Inductor's plan allocates,
    one step per allocation or free, and its inputs die where the plan drops them."""
    from memfit.planner.inductor_plan import ALLOC

    bufs: dict[str, list] = {}
    first_step = sim.step + 1
    output_args: list = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            sim.step += 1
            sim.schedule.append((graph, n.name))
            bufs[n.name] = _placeholder(sim, graph, n, placeholder_bufs, free_tangents)
        elif n.op == "output":
            output_args = list(n.args[0]) if isinstance(n.args[0], (list, tuple)) else [n.args[0]]
    by_key: dict = {name: bufs.get(name, []) for name in plan.inputs}
    freed = set()
    for kind, key, nbytes in plan.events:
        sim.step += 1
        if kind == ALLOC:
            b = Buffer(len(sim.buffers), graph, f"inductor buffer {key}", -(-nbytes // sim.g) * sim.g, new_kind, sim.step)
            b.last_use = sim.step
            sim.buffers.append(b)
            by_key[key] = [b]
            sim.schedule.append((graph, b.producer))
        else:
            freed.add(key)
            for b in by_key.get(key) or []:
                if b is not None:
                    b.last_use = max(b.last_use, sim.step)
            sim.schedule.append((graph, f"free {key}" if isinstance(key, str) else f"free inductor buffer {key}"))
    sim.step += 1  # the return: what was neither freed nor returned dies here
    sim.schedule.append((graph, "return"))
    for key, bl in by_key.items():
        if key not in freed:
            for b in bl or []:
                if b is not None:
                    b.last_use = max(b.last_use, sim.step)
    for i, a in enumerate(output_args):
        if isinstance(a, torch.fx.Node):
            key = plan.outputs[i] if i < len(plan.outputs) else None
            got = by_key.get(key) if key is not None else None
            if got:
                bufs[a.name] = got
            elif a.name not in bufs:
                bufs[a.name] = [None]
    # name the buffers after the FX values they hold, where the outputs say so (for the report)
    for a in output_args:
        if isinstance(a, torch.fx.Node) and a.op != "placeholder":
            for b in bufs.get(a.name) or []:
                if b is not None and b.producer.startswith("inductor buffer"):
                    b.producer = a.name
                    b.module, b.source = source_of(a)
    return bufs, output_args, first_step


_CONSTRUCTORS = {"full", "zeros", "ones", "scalar_tensor", "arange", "iota", "empty", "full_like", "zeros_like", "ones_like"}
# Inductor lowers these to indirect loads inside a pointwise kernel, so they fuse both ways.
_INDEXING = {"gather", "index", "embedding"}


def _is_pointwise(n: torch.fx.Node) -> bool:
    t = n.target
    if not isinstance(t, torch._ops.OpOverload):
        return False
    if torch.Tag.pointwise in t.tags:
        return True
    return t.overloadpacket.__name__ in _CONSTRUCTORS or t.overloadpacket.__name__ in _INDEXING


_REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "var_mean", "var", "prod", "argmax", "argmin", "any", "all"}


def _is_reduction(n: torch.fx.Node) -> bool:
    t = n.target
    return isinstance(t, torch._ops.OpOverload) and t.overloadpacket.__name__ in _REDUCTIONS


def addmm_rewrites(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, torch.fx.Node]:
    """``mm -> add`` for each ``add(mm(a, b), c)`` that Inductor turns into ``addmm(c, a, b)``.

    Inductor's post-grad pass (torch/_inductor/fx_passes/post_grad.py, ``addmm``) computes the product
    where the sum is, so ``a`` and ``b`` live until the ``add`` and the product is never a buffer of
    its own. With tied embeddings the head's weight gradient is ``mm(dlogits.T, x)`` added to the
    embedding's gradient at the very end of the backward: the [tokens, vocab] logits gradient stays
    allocated through the whole backward (2-layer GPT: 4 MiB of an 11.2 MiB peak). On a GPU Inductor
    keeps them apart when the sum feeds only pointwise ops; the model follows the CPU rule there too,
    which errs towards more memory.
    """
    out = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is not torch.ops.aten.mm.default or len(n.users) != 1:
            continue
        (u,) = n.users
        if u.target is not torch.ops.aten.add.Tensor or u.kwargs.get("alpha", 1) != 1 or len(u.args) != 2:
            continue
        other = u.args[1] if u.args[0] is n else u.args[0]
        if other is n or not isinstance(other, torch.fx.Node):
            continue
        ov, mv = other.meta.get("val"), n.meta.get("val")
        if not isinstance(ov, torch.Tensor) or not isinstance(mv, torch.Tensor) or ov.dtype != mv.dtype:
            continue
        try:
            if tuple(torch.broadcast_shapes(tuple(ov.shape), tuple(mv.shape))) != tuple(mv.shape):
                continue
        except RuntimeError:
            continue
        out[n] = u
    return out


def fused_away(gm: torch.fx.GraphModule, extern: frozenset = frozenset()) -> set[torch.fx.Node]:
    """Nodes whose values a fusing compiler never writes to memory (an approximation of Inductor).

    A pointwise op (or a constructor such as ``full``) whose every consumer, seen through views, is
    a pointwise op or a reduction gets fused into that consumer's kernel. Anything a graph returns,
    anything an extern kernel (matmul, attention, convolution, scatter, ...) reads, and every other
    op's output is written out (``extern``: pointwise nodes Inductor computes in an extern kernel, such
    as an ``add`` that becomes ``addmm``). Inductor may still materialise a fused value it reads many times;
    the model errs on the side of fewer bytes there and is checked against measurement.
    """
    outputs = set()
    for n in gm.graph.nodes:
        if n.op == "output":
            outputs = {a for a in n.all_input_nodes}
    away: set[torch.fx.Node] = set()

    def consumers(n: torch.fx.Node):
        for u in n.users:
            if u.op == "call_function" and is_view(u) and u.target is not operator.getitem:
                if u in outputs:
                    yield None
                yield from consumers(u)
            else:
                yield u

    for n in gm.graph.nodes:
        if n.op != "call_function" or n in outputs or is_view(n) or not _is_pointwise(n):
            continue
        users = list(consumers(n))
        if users and all(
            u is not None and u.op == "call_function" and u not in extern and (_is_pointwise(u) or _is_reduction(u))
            for u in users
        ):
            away.add(n)
    return away
