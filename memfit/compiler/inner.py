"""The inner compilers an attempt hands its partitioned graphs to.

* :func:`boxed_eager`: op by op (``inner="eager"``), freeing each value after its last use.
* :func:`inductor_inner_compile`: Inductor's ``compile_fx_inner``, capturing each graph's buffer plan
  (``memfit.planner.inductor_plan``) into the attempt's own dict so that the step can be replayed as
  compiled and checked against the budget.
* :func:`compile_backward`: a backward the split-backward pass marked becomes B and W, each compiled by
  the inner compiler, behind one callable that runs B and queues W.
* :class:`InductorPartitioner`: how an attempt's partition is installed in Inductor.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Sequence

import torch
import torch.fx


def boxed_eager(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    """Run the graph op by op; the boxed call clears its argument list so inputs die at last use."""
    from torch.fx.graph import _BoxedCodeGen

    gm.graph.set_codegen(_BoxedCodeGen())
    gm.recompile()

    def run(args: list) -> Any:
        return gm(args)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run


def compile_backward(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, compile_one: Callable, **kwargs):
    """Compile a backward graph; a split one (see ``memfit.compiler.attempt.Attempt.split``) becomes B and W, each
    compiled by ``compile_one``, behind one boxed callable that runs B and queues W."""
    split = gm.meta.get("memfit_split")
    if split is None:
        return compile_one(gm, example_inputs, **kwargs)
    from memfit.passes.split_backward import _output_node
    from memfit.runtime import SplitBackward

    name, plan, b, w = split
    b_ph = [n.name for n in b.graph.nodes if n.op == "placeholder"]
    # The backward's inputs may not have the strides their FX values claim (Inductor lays out what
    # the forward saves as it likes, and tells the backward compile through these example inputs),
    # so B's values are re-derived from them and W is compiled for what B will really hand over.
    from torch._guards import detect_fake_mode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is not None:
        FakeTensorProp(b, mode=fake_mode).propagate_dont_convert_inputs(*example_inputs)
        vals = {n.name: n.meta["val"] for n in b.graph.nodes if "val" in n.meta}
        for n in w.graph.nodes:
            if n.op == "placeholder" and n.name in vals:
                n.meta["val"] = vals[n.name]
    w_examples = [n.meta.get("val") for n in w.graph.nodes if n.op == "placeholder"]
    run_b = compile_one(b, example_inputs, **kwargs)
    w_kwargs = dict(kwargs)
    if "static_input_idxs" in w_kwargs:
        w_kwargs["static_input_idxs"] = []
    run_w = compile_one(w, w_examples, **w_kwargs)
    n_outputs = len(_output_node(gm).args[0])
    return SplitBackward(name, plan, run_b, run_w, n_outputs, tuple(b_ph.index(p) for p in plan.weight_params))


def inductor_inner_compile(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, sink: dict, **kwargs: Any):
    """Inductor's ``compile_fx_inner``, with split backwards compiled as B and W; the buffer plan of each
    graph compiled goes into ``sink`` (one attempt's own dict, keyed by the name its partition put in the
    graph's ``meta``: the backward Inductor compiles is a copy of the one the partitioner returned, and
    the ``meta`` survives the copy)."""
    from torch._inductor.compile_fx import compile_fx_inner

    from memfit.passes.split_backward import _output_node

    if not kwargs.get("is_backward") or "memfit_split" not in gm.meta:
        from memfit.planner.inductor_plan import BufferPlan, capture

        with capture([]) as captured, _apart_checkpoint_regions():
            out = compile_fx_inner(gm, example_inputs, **kwargs)
        plans = [p for p in captured if isinstance(p, BufferPlan)]
        token = gm.meta.get("memfit_graph")
        if token is not None and len(plans) == 1 and len(captured) == 1:  # one graph, one plan: else no replay
            sink[token] = plans[0]
        return out

    def one(g, ex, **kw):
        # Every output keeps the stride its FX value has: W was compiled for the strides of the
        # values B hands over (seen otherwise: B chose channels-last for a conv gradient and W's
        # input assertion failed), and W's results go into .grad, which has its parameter's strides.
        out = _output_node(g)
        out.meta["user_visible_output_idxs"] = [i for i, a in enumerate(out.args[0]) if isinstance(a, torch.fx.Node)]
        with _apart_checkpoint_regions():
            return compile_fx_inner(g, ex, **kw)

    return compile_backward(gm, example_inputs, compile_one=one, **kwargs)


def _checkpoint_regions(node) -> frozenset:
    """The user's checkpoint regions (``torch.utils.checkpoint``, HF's ``gradient_checkpointing_enable()``)
    whose nodes an Inductor scheduler node computes: the ``ac_graph_id`` AOTAutograd tags them with."""
    out = set()
    for sn in node.get_nodes():
        for origin in getattr(getattr(sn, "node", None), "origins", None) or ():
            region = origin.meta.get("ac_graph_id")
            if region is not None and origin.meta.get("recompute") is not None:
                out.add(region)
    return frozenset(out)


class _ApartCheckpointRegions:
    """Inductor's fusion choices, except that nodes of different checkpoint regions are never fused
    horizontally (side by side: neither reads the other).

    A backward recomputes each checkpointed layer just before that layer's gradient, so one layer's
    recomputed activations are live at a time. Inductor fuses consumers that read the same buffers, and
    the recomputations of two layers read the same attention mask: fused, both layers' attention
    probabilities are recomputed at once, and live together. Inductor keeps apart only nodes more than 64
    scheduler nodes away (``Scheduler.are_long_distant_nodes``, written for this case), and a streamed
    graph's layers are shorter than that (each region is one node). Seen on an HF GPT-2 (2 x 64, 2 x 256
    tokens, dropout 0.1) with ``gradient_checkpointing_enable()``, its regions streamed: the backward
    held six [2, 4, 256, 256] buffers (12 MiB) at once and the step measured 17.31 MiB; kept apart, 13.30.
    Everything else is the handler that was in place (a user's ``inductor_choices_class`` included)."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def can_fuse_horizontal(self, scheduler, node1, node2, shared_data_score) -> bool:
        r1, r2 = _checkpoint_regions(node1), _checkpoint_regions(node2)
        if r1 and r2 and r1.isdisjoint(r2):
            return False
        return self._inner.can_fuse_horizontal(scheduler, node1, node2, shared_data_score)


def _apart_checkpoint_regions():
    """A context in which Inductor's scheduler keeps checkpoint regions apart (:class:`_ApartCheckpointRegions`)."""
    from torch._inductor.virtualized import V

    return V.set_choices_handler(_ApartCheckpointRegions(V.choices))


try:
    from torch._inductor.custom_graph_pass import CustomPartitionerFn as _PartitionerBase
except ImportError:  # pragma: no cover - torch is pinned to 2.13, which has it
    _PartitionerBase = object  # type: ignore[misc,assignment]


class InductorPartitioner(_PartitionerBase):  # type: ignore[misc]
    """Inductor's ``custom_partitioner_fn``: memfit's partition of one attempt, on the min-cut baseline."""

    def __init__(self, partition: Callable):
        self.partition = partition
        self._uuid = f"memfit-partitioner-{uuid.uuid4()}"

    def __call__(self, gm, joint_inputs, **kwargs):
        return self.partition(gm, joint_inputs, joint_partitioner="mincut", **kwargs)

    def __deepcopy__(self, memo: dict) -> "InductorPartitioner":
        # Inductor deep-copies its config to key the FX graph cache; the partitioner's identity is its
        # uuid, and copying it would copy the attempt with every graph it recorded (and any open
        # progress stream, which cannot be copied at all).
        return self

    def uuid(self) -> Any:
        # Never equal to another compile's: a cache hit would skip the partition, and with it the
        # plan and the record of what was done (the FX graph cache still applies to the partitioned
        # forward and backward, which is safe: it keys on those graphs themselves).
        return self._uuid
