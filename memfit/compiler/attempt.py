"""One attempt at compiling one Dynamo graph, as a value.

An :class:`Attempt` owns everything one compile produces: the AOTAutograd partition callback (where
the planner is asked for a plan and the passes carry it out), the inner compile, the
:class:`~memfit.compiler.records.GraphRecord` of each graph, the notes waiting for the first record,
and Inductor's buffer plans. It never touches the backend's committed state: a search
(``memfit.compiler.search``) runs as many attempts as it needs and keeps one, and the backend commits
what the kept attempt recorded. Nothing is rolled back because nothing is shared.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.fx
from torch._functorch.partitioners import default_partition, min_cut_rematerialization_partition

from memfit.compiler import planning
from memfit.compiler.inner import InductorPartitioner, boxed_eager, compile_backward, inductor_inner_compile
from memfit.compiler.planning import Planning
from memfit.compiler.records import GraphRecord
from memfit.errors import BudgetError, CantApply, Note, is_note
from memfit.planner.analysis import analyze_pairs
from memfit.planner.choice import Candidate
from memfit.planner.memory import GraphPair, simulate
from memfit.units import format_bytes


def note_and_warn(record: GraphRecord, msg: str) -> None:
    """A budget the compiled graph misses is never silent: in its record's notes, and a warning."""
    record.notes.append(Note(msg, "budget", "over_budget"))
    warnings.warn(msg, stacklevel=3)


class Attempt:
    """One compile of one graph. Build one per try; read ``compiled``, ``records``, ``infeasible``.

    ``backend`` supplies what is fixed for the graph (options, the step budget, which inputs are
    parameters, graph names, progress); ``notes`` are pending for the first record (from passes run
    before AOTAutograd, such as ``stream``); ``tighten`` < 1 plans for a smaller budget (a re-plan of an
    over-budget Inductor compile)."""

    def __init__(self, backend: Any, notes: Sequence[str] = (), *, tighten: float = 1.0, probe: bool = False,
                 remember: Callable[["JointSnapshot"], None] | None = None):
        self.backend = backend
        self.remember = remember
        """Given the graph's :class:`JointSnapshot` (a probe's): see :meth:`partition_again`."""
        self.probe = probe
        """A stream search's probe (:func:`memfit.compiler.search.search_streams`): planned without the
        share-norms rewrite, which is a third of a probe's time on ``examples/gpt.py`` (planning it and
        partitioning the rewritten graph: 1.5 of 4.5 s) and moves its peak by 0-3%; the compile of the
        chosen configuration plans with it."""
        self.options = backend.options
        self.notes: list[str] = list(notes)
        self.tighten = tighten
        self.records: list[GraphRecord] = []
        self.infeasible: list[str] = []
        """The messages of the graphs no plan fitted (``strict=False``)."""
        self.buffer_plans: dict[str, Any] = {}
        """Inductor's buffer plans of the graphs compiled in this attempt, by ``"g0.fw"``-style name."""
        self.compiled: Callable | None = None
        self.error: BudgetError | None = None
        """Set by a search that catches this attempt's refusal to weigh it against another."""
        self.caught: list = []
        """Warnings recorded while a search held this attempt; shown only if it is kept."""
        self._names = itertools.count(len(backend.records))
        """Graph names continue from the graphs the backend has kept: every attempt of one search names
        its graphs alike, so the kept one is ``g0`` for a model's first graph (a streamed plan's report
        called it ``g9``, after the probes the search had compiled)."""

    @property
    def peak(self) -> int:
        """Its smallest reachable peak (refused) or its records' predicted peak."""
        if self.error is not None:
            return self.error.smallest_peak
        return max((r.peak_bytes for r in self.records), default=0)

    @property
    def fused(self) -> bool:
        return self.backend.fused

    @property
    def passes(self) -> tuple[str, ...]:
        return self.backend.passes

    # -- compiles ------------------------------------------------------------------------------
    def compile_eager(self, gm, example_inputs, *, joint_partitioner="default", decompositions=None,
                      joint_passes=False) -> Callable:
        """``aot_autograd`` with this attempt's partition and boxed eager compilers (also the analysis
        path on fake tensors, with Inductor's decompositions, joint passes and min-cut baseline)."""
        from torch._dynamo.backends.common import aot_autograd

        self.compiled = aot_autograd(
            fw_compiler=boxed_eager,
            bw_compiler=functools.partial(compile_backward, compile_one=lambda g, ex, **kw: boxed_eager(g, ex)),
            inference_compiler=boxed_eager,
            partition_fn=functools.partial(self.partition, joint_partitioner=joint_partitioner, joint_passes=joint_passes),
            decompositions=decompositions,
            keep_inference_input_mutations=True,
        )(gm, example_inputs)
        return self.compiled

    def compile_inductor(self, gm, example_inputs) -> Callable:
        """Inductor's ``compile_fx`` with this attempt's partition, then the compiled step replayed from
        the buffer plans Inductor made (see :meth:`replay`)."""
        from torch._inductor.compile_fx import compile_fx

        # AOTAutogradCache keys on the partitioner's uuid() but treats None like "no custom
        # partitioner": a graph plain torch.compile cached earlier would be served without memfit's
        # partition (seen here: a benchmark compiling the same model both ways lost every record).
        # So the cache is off for memfit's graphs, and the uuid is unique anyway.
        # The backward is compiled now, not at its first call, so that its buffer plan can be checked
        # before the step runs (and the graph re-planned if it is over the budget).
        with torch._functorch.config.patch(enable_autograd_cache=False, force_non_lazy_backward_lowering=True):
            self.compiled = compile_fx(
                gm,
                example_inputs,
                config_patches={
                    "custom_partitioner_fn": InductorPartitioner(self.partition),
                    # a cache hit generates no code, so there would be no buffer plan to replay
                    "fx_graph_cache": False,
                    # Layout optimisation makes the forward save a channels-last *copy* of a
                    # convolution's weight under the parameter's name; the split backward needs the
                    # parameter itself (W accumulates into its .grad).
                    **({"layout_optimization": False} if "split_backward" in self.passes else {}),
                },
                decompositions=self.backend.decompositions() if "fewbit" in self.passes else None,
                inner_compile=functools.partial(inductor_inner_compile, sink=self.buffer_plans),
            )
        self.replay()
        return self.compiled

    def replay(self) -> None:
        """Attach Inductor's buffer plans to the records compiled in this attempt, and replay them."""
        for r in self.records:
            fw = self.buffer_plans.get(f"{r.name}.fw")
            bw = self.buffer_plans.get(f"{r.name}.bw")
            if r.split is not None or fw is None or (r.pair.backward is not None and bw is None):
                why = ("the split backward is compiled as B and W apart" if r.split is not None
                       else "Inductor's code generator gave no buffer plan to read")
                r.notes.append(Note(
                    f"inductor: not replayed ({why}); the budget is checked on the planner's model only",
                    "inductor", "not_replayed",
                ))
                continue
            r.buffer_plans = {f"{r.name}.fw": fw, **({f"{r.name}.bw": bw} if bw is not None else {})}
            profile = r.analysis.profile
            r.compiled = simulate([r.pair], granularity=profile.alloc_granularity, fused=True, buffer_plans=r.buffer_plans)
            r.notes.append(Note(
                f"inductor: the compiled graphs' buffer plans replay to a step peak of {format_bytes(r.compiled.peak_bytes)} "
                f"(the planner's model: {format_bytes(r.analysis.memory.peak_bytes)})",
                "inductor",
            ))

    # -- partition: where the plan is carried out ---------------------------------------------
    def partition(
        self,
        joint: torch.fx.GraphModule,
        joint_inputs: Sequence[Any],
        *,
        num_fwd_outputs: int,
        joint_partitioner: str = "default",
        joint_passes: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
        """AOTAutograd's partition callback: the baseline partition, the planner's choice, the passes
        that carry it out, and the graph's record."""
        name = f"g{next(self._names)}"
        if self.backend.progress:
            self.backend.progress(f"graph {name}: {len(joint.graph.nodes)} nodes; partitioning and planning")
        if joint_passes:  # what Inductor runs before calling its partitioner
            from torch._guards import detect_fake_mode
            from torch._inductor.compile_fx import _recursive_joint_graph_passes
            from torch._inductor.virtualized import V

            # Under Inductor's compile_fx the fake mode is set; here it is not, and the pass that fuses
            # the random ops' seeds (a dropout drawn by ``rand_like``) raised "'NullHandler' object does
            # not support the context manager protocol": `memfit analyze`, `memfit plan` and the stream
            # search failed on every model with dropout under Inductor.
            with V.set_fake_mode(detect_fake_mode(joint_inputs)):
                joint = _recursive_joint_graph_passes(joint, skip_invoke_subgraph=True)
        return self._partition(name, joint, joint_inputs, num_fwd_outputs, joint_partitioner, kwargs)

    def partition_again(self, snap: "JointSnapshot", keys: dict) -> None:
        """Plan a graph whose joint graph is ``snap``'s with its ``memfit::stream`` keys renamed by ``keys``,
        without tracing it: the same step streamed in another chunk count (only the regions behind the keys
        differ, and with them the ops' scratch and time, which the planner reads from the regions). Its
        baseline partition is ``snap``'s too (the min-cut partitioner does not read the regions). Skips
        AOTAutograd's trace, Inductor's joint-graph passes and the min-cut partition: 70% of a probe of the
        Llama-3-8B config (cProfile: 91, 58 and 43 of 267 s over nine compiles). A probe only: nothing is
        compiled (``compiled`` stays None)."""
        name = f"g{next(self._names)}"
        if self.backend.progress:
            self.backend.progress(f"graph {name}: {len(snap.joint.graph.nodes)} nodes (traced before, as streamed in "
                                  "other chunk counts); planning")
        joint = _renamed(snap.joint, keys)
        baseline = (_renamed(snap.fw, keys), _renamed(snap.bw, keys))
        self._partition(name, joint, snap.joint_inputs, snap.num_fwd_outputs, snap.joint_partitioner, dict(snap.kwargs),
                        baseline=baseline)

    def _partition(self, name, joint, joint_inputs, num_fwd_outputs, joint_partitioner, kwargs, baseline=None):
        """The partition callback's work after the joint-graph passes (see :meth:`partition`)."""
        snap_kwargs = dict(kwargs)
        ctx = self.planning(name, joint, joint_inputs, num_fwd_outputs, joint_partitioner, kwargs, baseline)
        rewritable = None
        if "fewbit" in self.passes:
            from memfit.passes import fewbit as fewbit_pass

            rewritable = fewbit_pass.clone(joint)
            if joint_partitioner == "mincut":  # what Inductor would have decomposed while tracing
                fewbit_pass.decompose(joint, fewbit_pass.HELD_BACK)
        base = Candidate("unchanged", *ctx.baseline(), None, None)
        if self.remember is not None:
            # the joint graph as the planner gets it: after the min-cut partitioner, which changes it in place
            # (copied before it, a reused probe planned a different checkpoint plan: 606 nodes, not 583)
            self.remember(JointSnapshot(_renamed(joint, {}), joint_inputs, num_fwd_outputs, joint_partitioner, snap_kwargs,
                                        _renamed(base.fw, {}), _renamed(base.bw, {})))
        base.pair, base.analysis = ctx.analyse(base.fw, base.bw)
        shared = None
        if "share_norms" in self.passes and not self.probe and (self.options.passes != "auto" or (ctx.budget is not None and base.peak > ctx.budget)):
            shared = planning.share_norms(self, ctx, base)
            if shared is not None:
                ctx.joint, ctx.share = shared.joint, shared.share
                if rewritable is not None:
                    try:
                        rewritable = planning.share_copy(ctx, rewritable)
                    except CantApply as e:
                        ctx.notes.append(e.note("fewbit", f"fewbit: not tried: its copy of the graph could not "
                                                          f"share the norms ({e.reason})"))
                        rewritable = None
        try:
            if self.options.passes == "auto":
                chosen, candidates = planning.choose(self, ctx, rewritable, base, shared)
                chosen.joint = chosen.joint or joint
            else:
                chosen, candidates = planning.named(self, ctx, rewritable, base, shared), []
        except BudgetError as e:  # a search that weighs this refusal against another compile reports from it
            e.baseline = (base.pair, base.analysis)
            raise
        split_plan = None
        if "split_backward" in self.passes:
            from torch._functorch.partitioners import _is_primal

            primal_names = [n.name for n in chosen.joint.graph.nodes if _is_primal(n)]
            split_plan = planning.split(self, chosen.fw, chosen.bw, num_fwd_outputs, primal_names, ctx.params, name,
                                        ctx.notes, budget=ctx.budget)
            if split_plan is not None:
                chosen.pair, chosen.analysis = ctx.analyse(chosen.fw, chosen.bw)
        self.records.append(self._record(ctx, base, chosen, split_plan, candidates, joint_partitioner))
        for tag, g in (("fw", chosen.fw), ("bw", chosen.bw)):
            if g is not None:
                g.meta["memfit_graph"] = f"{name}.{tag}"
        return chosen.fw, chosen.bw

    def planning(self, name, joint, joint_inputs, num_fwd_outputs, joint_partitioner, kwargs,
                 known_baseline=None) -> "Planning":
        """What planning this joint graph needs: its baseline partition (``known_baseline``: already made),
        how to analyse a partition, the budget to plan for (smaller while re-planning an over-budget
        Inductor compile), and the notes pending for its record."""
        compiler = kwargs.pop("compiler", "inductor")

        def baseline(graph=None):
            if graph is None and known_baseline is not None:
                return known_baseline
            graph = joint if graph is None else graph
            if joint_partitioner == "mincut":
                return min_cut_rematerialization_partition(
                    graph, joint_inputs, compiler=compiler, num_fwd_outputs=num_fwd_outputs, **kwargs
                )
            return default_partition(graph, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)

        primals = joint_inputs[0] if isinstance(joint_inputs, (list, tuple)) and joint_inputs else ()
        params = self.backend.param_inputs
        params = params if params and len(params) == len(primals) else None

        def analyse(fw, bw):
            pair = GraphPair(fw, bw, num_fwd_outputs, name, params)
            return pair, analyze_pairs([pair], device=self.options.device, fused=self.fused)

        notes: list[str] = list(self.notes)
        self.notes.clear()
        step_budget = self.backend.step_budget()
        budget = step_budget.budget
        if budget is not None and self.tighten != 1.0:
            why = (f"the previous compile's buffer plan replayed over the budget of {format_bytes(budget)}"
                   if self.tighten < 1.0 else
                   f"the smallest-peak plan, compiled to judge its replayed peak against the budget of "
                   f"{format_bytes(budget)} (the planner's FX-level model refused it)")
            notes.append(Note(f"inductor: planned for {format_bytes(int(budget * self.tighten))}: {why}", "inductor", "retry"))
            budget = int(budget * self.tighten)
        return Planning(joint, num_fwd_outputs, kwargs.get("static_lifetime_input_indices"), analyse, budget, notes,
                         "min-cut" if joint_partitioner == "mincut" else "default", name, params, baseline, step_budget)

    def _record(self, ctx: "Planning", base: Candidate, chosen: Candidate, split_plan, candidates, joint_partitioner):
        """The graph's record: what was chosen, what it replaced, and every decision, checked against the
        budget."""
        from memfit.planner.report import decision_rows

        cid = torch._guards.CompileContext.current_compile_id()
        plan, fewbit_plan = chosen.plan, chosen.fewbit
        record = GraphRecord(
            ctx.name,
            chosen.pair,
            chosen.analysis,
            partition="checkpoint" if plan is not None else ("fewbit" if fewbit_plan is not None else
                                                             "share_norms" if chosen.share is not None else joint_partitioner),
            notes=ctx.notes,
            frame=getattr(cid, "frame_id", None),
            plan=plan,
            fewbit=fewbit_plan,
            split=split_plan,
            before=base.analysis,
            before_pair=base.pair,
            budget=ctx.step_budget,
            candidates=candidates,
        )
        record.share = chosen.share
        record.decisions = decision_rows(ctx.name, chosen.joint, plan, fewbit_plan, split_plan, chosen.share)
        if not self.passes:
            record.notes.append(Note(
                f"passes={self.options.passes!r}: no memory pass enabled; the graph was partitioned by the "
                f"{ctx.partition_name} partitioner and compiled unchanged",
                None, "nothing_to_do",
            ))
        self.check_budget(record)
        return record

    # -- the techniques, as the partition drives them -------------------------------------------
    def check_budget(self, record: GraphRecord) -> None:
        budget = record.budget.budget if record.budget is not None else self.options.budget
        peak = record.analysis.memory.peak_bytes
        if any(is_note(n, "kept_smallest") for n in record.notes):
            return  # strict=False: the smallest-peak plan was kept, and the note says so
        if budget is not None and peak > budget:
            msg = (
                f"memfit: graph {record.name} has a predicted step peak of {format_bytes(peak)}, over the "
                f"budget of {format_bytes(budget)}, and no enabled memory pass reduced it "
                f"(passes={self.options.passes!r}); the graph is compiled unchanged"
            )
            note_and_warn(record, msg)


class JointSnapshot(NamedTuple):
    """A joint graph as the partition callback got it (after Inductor's joint passes), with its baseline
    partition: copies, for :meth:`Attempt.partition_again`."""

    joint: torch.fx.GraphModule
    joint_inputs: Any
    num_fwd_outputs: int
    joint_partitioner: str
    kwargs: dict
    fw: torch.fx.GraphModule
    bw: torch.fx.GraphModule | None


def _renamed(gm: torch.fx.GraphModule | None, keys: dict) -> torch.fx.GraphModule | None:
    """A copy of ``gm`` (not code-generated: analysed, never run) whose ``memfit::stream`` ops' region keys
    are renamed by ``keys``."""
    if gm is None:
        return None
    import memfit.kernels.stream  # noqa: F401  (registers torch.ops.memfit.stream*)
    from memfit.planner.graphs import copy_graph_module

    ops = (torch.ops.memfit.stream.default, torch.ops.memfit.stream_backward.default)

    def rename(n):
        if n.op == "call_function" and n.target in ops and n.args and n.args[0] in keys:
            n.args = (keys[n.args[0]], *n.args[1:])

    return copy_graph_module(gm, lazy=True, rewrite=rename)


__all__ = ["Attempt", "JointSnapshot", "note_and_warn"]
