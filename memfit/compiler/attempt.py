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
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch._functorch.partitioners import default_partition, min_cut_rematerialization_partition

from memfit.compiler.inner import InductorPartitioner, boxed_eager, compile_backward, inductor_inner_compile
from memfit.compiler.records import GraphRecord
from memfit.errors import BudgetError, CantApply, Note, is_note
from memfit.planner import choice
from memfit.planner.analysis import StepAnalysis, analyze_pairs
from memfit.planner.choice import Candidate
from memfit.planner.memory import GraphPair, simulate
from memfit.units import format_bytes


def checkpoint_note(plan, budget: int, analysis: StepAnalysis) -> Note:
    return Note(
        f"checkpoint: {len(plan.saved)} values saved, {len(plan.recomputed)} recomputed; predicted peak "
        f"{format_bytes(plan.predicted_peak)} within the budget {format_bytes(budget)}, recompute "
        f"{plan.recompute_time_s * 1e3:.3f} ms ({analysis.profile.name} roofline); planned in "
        f"{plan.plan_time_s:.2f} s over {plan.probes} probes",
        "checkpoint", "applied",
    )


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

    def __init__(self, backend: Any, notes: Sequence[str] = (), *, tighten: float = 1.0):
        self.backend = backend
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
        name = self.backend.next_graph_name()
        if self.backend.progress:
            self.backend.progress(f"graph {name}: {len(joint.graph.nodes)} nodes; partitioning and planning")
        if joint_passes:  # what Inductor runs before calling its partitioner
            from torch._inductor.compile_fx import _recursive_joint_graph_passes

            joint = _recursive_joint_graph_passes(joint, skip_invoke_subgraph=True)
        ctx = self._planning(name, joint, joint_inputs, num_fwd_outputs, joint_partitioner, kwargs)
        rewritable = None
        if "fewbit" in self.passes:
            from memfit.passes import fewbit as fewbit_pass

            rewritable = fewbit_pass.clone(joint)
            if joint_partitioner == "mincut":  # what Inductor would have decomposed while tracing
                fewbit_pass.decompose(joint, fewbit_pass.HELD_BACK)
        base = Candidate("unchanged", *ctx.baseline(), None, None)
        base.pair, base.analysis = ctx.analyse(base.fw, base.bw)
        if self.options.passes == "auto":
            chosen, candidates = self.choose(ctx, rewritable, base)
            chosen.joint = chosen.joint or joint
        else:
            chosen, candidates = self.named(ctx, rewritable, base), []
        split_plan = None
        if "split_backward" in self.passes:
            from torch._functorch.partitioners import _is_primal

            primal_names = [n.name for n in chosen.joint.graph.nodes if _is_primal(n)]
            split_plan = self.split(chosen.fw, chosen.bw, num_fwd_outputs, primal_names, ctx.params, name, ctx.notes)
            if split_plan is not None:
                chosen.pair, chosen.analysis = ctx.analyse(chosen.fw, chosen.bw)
        self.records.append(self._record(ctx, base, chosen, split_plan, candidates, joint_partitioner))
        for tag, g in (("fw", chosen.fw), ("bw", chosen.bw)):
            if g is not None:
                g.meta["memfit_graph"] = f"{name}.{tag}"
        return chosen.fw, chosen.bw

    def _planning(self, name, joint, joint_inputs, num_fwd_outputs, joint_partitioner, kwargs) -> "_Planning":
        """What planning this joint graph needs: its baseline partition, how to analyse a partition, the
        budget to plan for (smaller while re-planning an over-budget Inductor compile), and the notes
        pending for its record."""
        compiler = kwargs.pop("compiler", "inductor")

        def baseline():
            if joint_partitioner == "mincut":
                return min_cut_rematerialization_partition(
                    joint, joint_inputs, compiler=compiler, num_fwd_outputs=num_fwd_outputs, **kwargs
                )
            return default_partition(joint, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)

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
        if budget is not None and self.tighten < 1.0:
            notes.append(Note(
                f"inductor: planned for {format_bytes(int(budget * self.tighten))}: the previous compile's buffer plan "
                f"replayed over the budget of {format_bytes(budget)}",
                "inductor", "retry",
            ))
            budget = int(budget * self.tighten)
        return _Planning(joint, num_fwd_outputs, kwargs.get("static_lifetime_input_indices"), analyse, budget, notes,
                         "min-cut" if joint_partitioner == "mincut" else "default", name, params, baseline, step_budget)

    def named(self, ctx: "_Planning", rewritable, base: Candidate) -> Candidate:
        """``passes=[...]`` named: few-bit where it lowers the peak, then a checkpoint plan where the graph
        is still over the budget."""
        chosen = Candidate("named", base.fw, base.bw, base.pair, base.analysis, joint=ctx.joint)
        if rewritable is not None:
            got = self.fewbit(ctx, rewritable, base.bw, base.analysis, ctx.notes)
            if got is not None:
                ctx.joint, chosen.fewbit, (chosen.fw, chosen.bw, chosen.pair, chosen.analysis) = got
                chosen.joint = ctx.joint
        got = self.checkpoint_named(ctx, ctx.name, chosen.analysis)
        if got is not None:
            chosen.plan, (chosen.fw, chosen.bw, chosen.pair, chosen.analysis) = got
        return chosen

    def _record(self, ctx: "_Planning", base: Candidate, chosen: Candidate, split_plan, candidates, joint_partitioner):
        """The graph's record: what was chosen, what it replaced, and every decision, checked against the
        budget."""
        from memfit.planner.report import decision_rows

        cid = torch._guards.CompileContext.current_compile_id()
        plan, fewbit_plan = chosen.plan, chosen.fewbit
        record = GraphRecord(
            ctx.name,
            chosen.pair,
            chosen.analysis,
            partition="checkpoint" if plan is not None else ("fewbit" if fewbit_plan is not None else joint_partitioner),
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
        record.decisions = decision_rows(ctx.name, chosen.joint, plan, fewbit_plan, split_plan)
        if not self.passes:
            record.notes.append(Note(
                f"passes={self.options.passes!r}: no memory pass enabled; the graph was partitioned by the "
                f"{ctx.partition_name} partitioner and compiled unchanged",
                None, "nothing_to_do",
            ))
        self.check_budget(record)
        return record

    # -- the techniques, as the partition drives them -------------------------------------------
    def checkpoint_named(self, ctx: "_Planning", name: str, analysis: StepAnalysis):
        """``passes=[..., "checkpoint"]``: plan and carry out a checkpoint plan where the graph is over the
        budget; returns (plan, (fw, bw, pair, analysis)) or None (the reason in ``ctx.notes``)."""
        budget = ctx.budget
        if budget is None or "checkpoint" not in self.passes:
            return None
        if analysis.memory.peak_bytes <= budget:
            ctx.notes.append(Note(
                f"checkpoint: not needed; the {ctx.partition_name} partition's predicted peak "
                f"{format_bytes(analysis.memory.peak_bytes)} is within the budget {format_bytes(budget)}",
                "checkpoint", "not_needed",
            ))
            return None
        try:
            plan, got = self.plan_checkpoint(ctx, ctx.joint, budget, analysis.profile, self.backend.curve_points)
        except CantApply as e:  # keep the baseline partition
            ctx.notes.append(e.note("checkpoint"))
            warnings.warn(f"memfit: checkpoint pass not applied to graph {name}: {e.reason}", stacklevel=3)
            return None
        ctx.notes.append(checkpoint_note(plan, budget, got[3]))
        return plan, got

    def plan_checkpoint(self, ctx: "_Planning", joint, budget, profile, curve_points=0):
        """Plan and carry out a checkpoint plan; returns it with (fw, bw, pair, analysis)."""
        from memfit.passes import checkpoint as ckpt
        from memfit.planner import checkpoint as planner

        ckpt.prepare(joint)

        def evaluate(saved):
            # a probe needs only the peak; the per-node costs are computed for the chosen plan alone
            fw, bw = ckpt.apply(joint, saved, num_fwd_outputs=ctx.num_fwd_outputs, static_lifetime_input_indices=ctx.static)
            pair = GraphPair(fw, bw, ctx.num_fwd_outputs)
            return simulate([pair], granularity=profile.alloc_granularity, fused=self.fused).peak_bytes, (fw, bw)

        margin = choice.plan_margin(self.fused)
        target = choice.planning_target(budget, self.fused)
        try:
            plan, (fw, bw) = planner.plan(
                joint,
                num_fwd_outputs=ctx.num_fwd_outputs,
                budget=target,
                profile=profile,
                evaluate=evaluate,
                curve_points=curve_points,
                progress=self.backend.progress,
            )
        except planner.Infeasible as e:
            err = BudgetError(e.smallest_peak, budget, margin, hints=self.backend.hints(e.smallest_peak, margin))
            if e.smallest is not None and not self.backend.strict:  # for a report of what does not fit
                fw, bw = e.result
                err.fallback = (e.smallest, (fw, bw, *ctx.analyse(fw, bw)))
            raise err from None
        return plan, (fw, bw, *ctx.analyse(fw, bw))

    def choose(self, ctx: "_Planning", rewritable, base: Candidate):
        """``passes="auto"``: evaluate the combinations of the enabled passes and keep the one of least
        predicted step time (roofline, recomputation and few-bit coding included) whose predicted peak fits
        (the rule: :func:`memfit.planner.choice.choose`).

        Few-bit is tried at ``choice.FEWBIT_WIDTHS`` bits alone (the first width that fits: least gradient
        error), then at ``fewbit_bits`` with a checkpoint plan. Returns (chosen, rows describing every
        candidate)."""
        budget, notes = ctx.budget, ctx.notes
        if budget is None:
            notes.append(Note(f"no budget: the {ctx.partition_name} partition is compiled unchanged", None, "no_budget"))
            return base, [base.row(None, chosen=True)]
        if base.peak <= budget:
            notes.append(Note(
                f"fits unchanged: the {ctx.partition_name} partition's predicted peak {format_bytes(base.peak)} is within "
                f"the budget {format_bytes(budget)}",
                None, "not_needed",
            ))
            self._curve_only(ctx, base)
            return base, [base.row(budget, chosen=True)]
        cands, smallest = [base], [base.peak]
        if "checkpoint" in self.passes:
            self._checkpoint_candidate(ctx, base, cands, smallest)
        if rewritable is not None:
            self._fewbit_candidates(ctx, rewritable, base, cands, smallest)
        chosen, exact = choice.choose(cands, budget)
        if chosen is None:
            margin = choice.refusal_margin(self.fused, self.passes)
            err = BudgetError(min(smallest), budget, margin, hints=self.backend.hints(min(smallest), margin))
            if self.backend.strict:
                raise err
            chosen = choice.smallest_peak(cands)
            notes.append(Note(f"does not fit: {err}", None, "kept_smallest"))
            self.infeasible.append(str(err))
        rows = [c.row(budget, chosen=c is chosen) for c in cands]
        notes.extend(chosen.notes)
        considered = ", ".join(f"{r['label']} {format_bytes(r['peak'])} {1e3 * r['time_s']:.3f} ms" for r in rows)
        notes.append(Note(
            f"auto: chose {chosen.label} (predicted peak {format_bytes(chosen.peak)}, step "
            f"{1e3 * chosen.time_s:.3f} ms vs {1e3 * base.time_s:.3f} ms unchanged) among: {considered}",
            "auto", "choice",
        ))
        if not chosen.exact:
            notes.append(Note(
                "auto: few-bit activation gradients are approximate: used because allow_approximation=True and "
                + ("no exact plan fits" if exact is None else "they are predicted faster than the best exact plan"),
                "auto", "choice",
            ))
        return chosen, rows

    def _curve_only(self, ctx: "_Planning", base: Candidate) -> None:
        """The report's budget-vs-time curve for a graph that fits unchanged (the plan is not applied)."""
        if self.backend.curve_points and "checkpoint" in self.passes:
            try:
                plan, _ = self.plan_checkpoint(ctx, ctx.joint, base.peak, base.analysis.profile, self.backend.curve_points)
                base.curve = plan.frontier
            except (BudgetError, CantApply):
                pass

    def _checkpoint_candidate(self, ctx: "_Planning", base: Candidate, cands: list, smallest: list) -> None:
        try:
            plan, (fw, bw, pair, analysis) = self.plan_checkpoint(
                ctx, ctx.joint, ctx.budget, base.analysis.profile, self.backend.curve_points
            )
            c = Candidate("checkpoint", fw, bw, pair, analysis, plan=plan, joint=ctx.joint)
            c.notes.append(checkpoint_note(plan, ctx.budget, analysis))
            c.curve = plan.frontier
            cands.append(c)
        except BudgetError as e:
            smallest.append(e.smallest_peak)
            ctx.notes.append(Note(
                f"checkpoint: smallest reachable peak {format_bytes(e.smallest_peak)}, over the budget",
                "checkpoint", "does_not_fit",
            ))
            if e.fallback is not None:
                plan, (fw, bw, pair, analysis) = e.fallback
                c = Candidate(
                    "checkpoint (smallest peak)", fw, bw, pair, analysis, plan=plan, joint=ctx.joint, over_budget=True
                )
                c.curve = plan.frontier
                cands.append(c)
        except CantApply as e:
            ctx.notes.append(e.note("checkpoint"))

    def _fewbit_candidates(self, ctx: "_Planning", rewritable, base: Candidate, cands: list, smallest: list) -> None:
        from memfit.passes import fewbit as fewbit_pass

        by_bits = {}
        for bits in choice.FEWBIT_WIDTHS:
            local: list[str] = []
            got = self.fewbit(ctx, fewbit_pass.clone(rewritable), base.bw, base.analysis, local, bits)
            if got is None:
                ctx.notes.extend(local)
                break
            fb_joint, fb_plan, (fw, bw, pair, analysis) = got
            c = Candidate(f"fewbit {bits}-bit", fw, bw, pair, analysis, fewbit=fb_plan, joint=fb_joint, exact=False)
            c.notes.extend(local)
            by_bits[bits] = c
            smallest.append(c.peak)
            if c.peak <= ctx.budget:
                cands.append(c)
                break
        else:
            combo = by_bits.get(self.options.fewbit_bits)
            if combo is not None and "checkpoint" in self.passes:
                try:
                    plan, (fw, bw, pair, analysis) = self.plan_checkpoint(ctx, combo.joint, ctx.budget, base.analysis.profile)
                    c = Candidate(
                        f"fewbit {combo.fewbit.bits}-bit + checkpoint", fw, bw, pair, analysis, plan=plan,
                        fewbit=combo.fewbit, joint=combo.joint, exact=False,
                    )
                    c.notes.extend(combo.notes)
                    c.notes.append(checkpoint_note(plan, ctx.budget, analysis))
                    cands.append(c)
                except BudgetError as e:
                    smallest.append(e.smallest_peak)
                except CantApply as e:
                    ctx.notes.append(e.note("fewbit", f"fewbit + checkpoint: not applied: {e.reason}"))

    def fewbit(self, ctx: "_Planning", rewritable, baseline_bw, baseline, notes, bits=None):
        """Plan and carry out the few-bit rewrite on ``rewritable`` (a copy of the joint graph); kept only
        where :func:`memfit.planner.choice.fewbit_helps`.

        Returns (joint, plan, (fw, bw, pair, analysis)) or None (the reasons are in ``notes``)."""
        from memfit.passes import checkpoint as ckpt
        from memfit.passes import fewbit as fewbit_pass
        from memfit.planner import fewbit as fewbit_planner

        bits = self.options.fewbit_bits if bits is None else bits
        plan = fewbit_planner.plan(rewritable, bits, self.options.fewbit_calibration)
        for node, reason in plan.skipped:
            notes.append(Note(f"fewbit: {node} left exact: {reason}", "fewbit", "left_exact"))
        if not plan.sites:
            notes.append(Note("fewbit: no activation derivative to rewrite in this graph", "fewbit", "nothing_to_do"))
            return None
        try:
            codes_of = fewbit_pass.apply(rewritable, plan)
            fewbit_pass.decompose(rewritable, fewbit_pass.HELD_BACK if self.fused else ())
            if self.fused and torch._functorch.config.cse:
                # The min-cut partitioner merges common subexpressions before choosing (the layer-norm
                # backward's recomputed mean and rstd become the forward's); its saved values name
                # nodes of that graph. Without the same merge here the backward would recompute whole
                # layers (seen: two addmm and two var_mean per GPT block) to rebuild the duplicates.
                from torch._functorch.compile_utils import fx_graph_cse

                rewritable.graph = fx_graph_cse(rewritable.graph)
                rewritable.recompile()
            saved = fewbit_pass.saved_after(rewritable, fewbit_pass.saved_names(baseline_bw), codes_of)
            fw, bw = ckpt.apply(rewritable, saved, num_fwd_outputs=ctx.num_fwd_outputs, static_lifetime_input_indices=ctx.static)
        except CantApply as e:
            notes.append(e.note("fewbit"))
            warnings.warn(f"memfit: few-bit pass not applied: {e.reason}", stacklevel=3)
            return None
        pair, analysis = ctx.analyse(fw, bw)
        before, after = baseline.memory.peak_bytes, analysis.memory.peak_bytes
        dropped = [s for s in plan.sites if s.saved not in saved]
        if not choice.fewbit_helps(before, after):
            notes.append(Note(
                f"fewbit: not applied: predicted peak {format_bytes(after)} with {len(plan.sites)} activation(s) coded, "
                f"{format_bytes(before)} without; the partition already saves only what the codes would replace "
                f"({len(dropped)} of {len(plan.sites)} saved inputs could be dropped)",
                "fewbit", "not_applied",
            ))
            return None
        notes.append(Note(
            f"fewbit: {len(plan.sites)} activation derivative(s) at {plan.bits} bits (approximate gradients), "
            f"{len(dropped)} saved input(s) replaced by codes; predicted peak {format_bytes(before)} -> "
            f"{format_bytes(after)}",
            "fewbit", "applied",
        ))
        for site in plan.sites:
            kept = "" if site in dropped else " (its input stays saved: the backward still reads it)"
            notes.append(Note(
                f"fewbit: {site.kind} at {site.source or site.backward}: saved {format_bytes(site.saved_bytes)} -> codes "
                f"{format_bytes(site.code_bytes)}, relative gradient error {100 * site.rel_error:.1f}%{kept}",
                "fewbit",
            ))
        return rewritable, plan, (fw, bw, pair, analysis)

    def split(self, fw, bw, num_fwd_outputs, primal_names, params, name, notes):
        """Plan the split of ``bw`` into B and W, then carry it out (stashed on ``bw.meta`` for the
        backward compiler); returns the plan, or None with the reason in ``notes`` and the graphs as
        they were."""
        from memfit.passes import split_backward as split_pass
        from memfit.planner import split_backward as split_planner

        try:
            plan = split_planner.plan_split(fw, bw, num_fwd_outputs=num_fwd_outputs, primals=primal_names, params=params)
        except (CantApply, split_planner.NothingToSplit) as e:
            reason = getattr(e, "reason", str(e))
            notes.append(Note(f"split_backward: not applied: {reason}", "split_backward",
                              getattr(e, "code", "nothing_to_do")))
            if isinstance(e, CantApply):
                warnings.warn(f"memfit: split backward not applied to graph {name}: {reason}", stacklevel=3)
            return None
        b, w = split_pass.carry_out(fw, bw, plan, num_fwd_outputs=num_fwd_outputs, primals=primal_names, params=params)
        bw.meta["memfit_split"] = (name, plan, b, w)
        notes.append(Note(plan.describe(), "split_backward", "applied"))
        for op, why in plan.kept_whole:
            notes.append(Note(f"split_backward: {op} kept as one call in B: {why}", "split_backward", "not_applied"))
        return plan

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


@dataclass
class _Planning:
    """What the planning of one joint graph shares between its steps (built by ``Attempt._planning``)."""

    joint: torch.fx.GraphModule
    num_fwd_outputs: int
    static: Any
    analyse: Callable
    """(fw, bw) -> (GraphPair, StepAnalysis) of a partition of this graph."""
    budget: int | None
    """The budget this graph is planned for (the step's, or smaller while re-planning)."""
    notes: list
    """The graph's record's notes, in the making."""
    partition_name: str
    name: str = ""
    params: Any = None
    baseline: Callable | None = None
    """() -> (fw, bw): the baseline partition (AOTAutograd's default under eager, min-cut under Inductor)."""
    step_budget: Any = None


__all__ = ["Attempt", "checkpoint_note", "note_and_warn"]
