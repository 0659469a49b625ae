"""How one partition drives the planner and the passes: the candidates ``passes="auto"`` weighs, the
passes named in ``passes=[...]``, and the split of the backward.

:meth:`memfit.compiler.attempt.Attempt.partition` calls these with the attempt (for its options, budget
and verdicts) and a :class:`Planning` of the joint graph. Each technique is planned by its planner
(``memfit.planner``), kept or dropped by the rules of :mod:`memfit.planner.choice`, and carried out by its
pass (``memfit.passes``); a refusal becomes a note with its technique and reason code.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx

from memfit.errors import BudgetError, CantApply, Note
from memfit.planner import choice
from memfit.planner.analysis import StepAnalysis
from memfit.planner.choice import Candidate
from memfit.planner.memory import GraphPair, simulate
from memfit.units import format_bytes


def checkpoint_note(plan, budget: int, analysis: StepAnalysis) -> Note:
    """The record's line for a checkpoint plan carried out."""
    return Note(
        f"checkpoint: {len(plan.saved)} values saved, {len(plan.recomputed)} recomputed; predicted peak "
        f"{format_bytes(plan.predicted_peak)} within the budget {format_bytes(budget)}, recompute "
        f"{plan.recompute_time_s * 1e3:.3f} ms ({analysis.profile.name} roofline); planned in "
        f"{plan.plan_time_s:.2f} s over {plan.probes} probes",
        "checkpoint", "applied",
    )


@dataclass
class Planning:
    """What the planning of one joint graph shares between its steps (built by ``Attempt.planning``)."""

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
    limits: tuple = ()
    """What bounded the checkpoint planner's smallest peak (``BudgetError.limits``), for auto's refusal."""
    share: Any = None
    """The share-norms plan carried out in ``joint`` (every candidate planned on it carries it)."""

    def label(self, technique: str) -> str:
        """A candidate's label: ``technique`` on the shared joint reads ``"share_norms + technique"``."""
        return f"share_norms + {technique}" if self.share is not None else technique


def share_norms(attempt, ctx: "Planning", base: Candidate) -> Candidate | None:
    """Plan and carry out the share-norms rewrite on a copy of the joint graph; kept where the
    baseline partition of the rewritten graph has a lower predicted peak. Returns the candidate (the
    rewritten joint and its partition) or None, the reasons in ``ctx.notes``."""
    from memfit.passes import share_norms as share_pass
    from memfit.planner import share_norms as planner

    values = [r() if r is not None else None for r in getattr(attempt.backend, "param_values", ())]
    plan = planner.plan(ctx.joint, ctx.num_fwd_outputs, values or None)
    for _, reason in plan.skipped:
        ctx.notes.append(Note(f"share_norms: {reason}; left as it is", "share_norms", "left_exact"))
    if not plan.sites:
        ctx.notes.append(Note("share_norms: no norm whose backward can read its output in this graph",
                              "share_norms", "nothing_to_do"))
        return None
    joint = share_pass.clone(ctx.joint)
    try:
        share_pass.apply(joint, plan, ctx.num_fwd_outputs)
        fw, bw = ctx.baseline(joint)
    except CantApply as e:
        ctx.notes.append(e.note("share_norms"))
        warnings.warn(f"memfit: share_norms not applied to graph {ctx.name}: {e.reason}", stacklevel=3)
        return None
    pair, analysis = ctx.analyse(fw, bw)
    before, after = base.peak, analysis.memory.peak_bytes
    if after >= before:
        ctx.notes.append(Note(
            f"share_norms: not applied: predicted peak {format_bytes(after)} with {len(plan.sites)} norm(s) sharing "
            f"their output, {format_bytes(before)} without (the {ctx.partition_name} partition's peak is not where "
            "their inputs are saved)",
            "share_norms", "not_applied",
        ))
        return None
    ctx.notes.append(Note(
        f"share_norms: {len(plan.sites)} norm(s) compute their backward from their output (exact); "
        f"{format_bytes(plan.saved_bytes)} of inputs no longer read by the backward; predicted peak "
        f"{format_bytes(before)} -> {format_bytes(after)}, step {1e3 * base.time_s:.3f} -> {1e3 * analysis.time_s:.3f} ms",
        "share_norms", "applied",
    ))
    return Candidate("share_norms", fw, bw, pair, analysis, joint=joint, share=plan)


def share_copy(ctx: "Planning", rewritable):
    """The few-bit pass's copy of the joint graph, shared like ``ctx.joint`` (the same node names)."""
    from memfit.passes import share_norms as share_pass

    shared = share_pass.clone(rewritable)
    share_pass.apply(shared, ctx.share, ctx.num_fwd_outputs)
    return shared


def named(attempt, ctx: "Planning", rewritable, base: Candidate, shared: Candidate | None = None) -> Candidate:
    """``passes=[...]`` named: shared norms where they lower the peak (done by the caller: ``shared``),
    few-bit where it lowers the peak, then a checkpoint plan where the graph is still over the budget."""
    start = shared or base
    chosen = Candidate("named", start.fw, start.bw, start.pair, start.analysis, joint=ctx.joint, share=ctx.share)
    if rewritable is not None:
        got = fewbit(attempt, ctx, rewritable, start.bw, start.analysis, ctx.notes)
        if got is not None:
            ctx.joint, chosen.fewbit, (chosen.fw, chosen.bw, chosen.pair, chosen.analysis) = got
            chosen.joint = ctx.joint
    got = checkpoint_named(attempt, ctx, ctx.name, chosen.analysis)
    if got is not None:
        chosen.plan, (chosen.fw, chosen.bw, chosen.pair, chosen.analysis) = got
    return chosen


def checkpoint_named(attempt, ctx: "Planning", name: str, analysis: StepAnalysis):
    """``passes=[..., "checkpoint"]``: plan and carry out a checkpoint plan where the graph is over the
    budget; returns (plan, (fw, bw, pair, analysis)) or None (the reason in ``ctx.notes``)."""
    budget = ctx.budget
    if budget is None or "checkpoint" not in attempt.passes:
        return None
    if analysis.memory.peak_bytes <= budget:
        ctx.notes.append(Note(
            f"checkpoint: not needed; the {ctx.partition_name} partition's predicted peak "
            f"{format_bytes(analysis.memory.peak_bytes)} is within the budget {format_bytes(budget)}",
            "checkpoint", "not_needed",
        ))
        return None
    try:
        plan, got = plan_checkpoint(attempt, ctx, ctx.joint, budget, analysis.profile, attempt.backend.curve_points)
    except CantApply as e:  # keep the baseline partition
        ctx.notes.append(e.note("checkpoint"))
        warnings.warn(f"memfit: checkpoint pass not applied to graph {name}: {e.reason}", stacklevel=3)
        return None
    ctx.notes.append(checkpoint_note(plan, budget, got[3]))
    return plan, got


def plan_checkpoint(attempt, ctx: "Planning", joint, budget, profile, curve_points=0):
    """Plan and carry out a checkpoint plan; returns it with (fw, bw, pair, analysis)."""
    from memfit.passes import checkpoint as ckpt
    from memfit.planner import checkpoint as planner

    ckpt.prepare(joint)

    def evaluate(saved):
        # a probe needs only the peak; the per-node costs are computed for the chosen plan alone
        fw, bw = ckpt.apply(joint, saved, num_fwd_outputs=ctx.num_fwd_outputs, static_lifetime_input_indices=ctx.static)
        pair = GraphPair(fw, bw, ctx.num_fwd_outputs)
        return simulate([pair], granularity=profile.alloc_granularity, fused=attempt.fused).peak_bytes, (fw, bw)

    margin = choice.plan_margin(attempt.fused)
    target = choice.planning_target(budget, attempt.fused)
    try:
        plan, (fw, bw) = planner.plan(
            joint,
            num_fwd_outputs=ctx.num_fwd_outputs,
            budget=target,
            profile=profile,
            evaluate=evaluate,
            curve_points=curve_points,
            progress=attempt.backend.progress,
            quick_refusal=attempt.probe,
        )
    except planner.Infeasible as e:
        err = BudgetError(e.smallest_peak, budget, margin, hints=attempt.backend.hints(e.smallest_peak, margin),
                          limits=e.limits)
        if e.limits:
            ctx.notes.append(Note("checkpoint: what bounds the smallest plan: " + "; ".join(e.limits), "checkpoint",
                                  "limits"))
        if e.smallest is not None and not attempt.backend.strict:  # for a report of what does not fit
            fw, bw = e.result
            err.fallback = (e.smallest, (fw, bw, *ctx.analyse(fw, bw)))
        raise err from None
    return plan, (fw, bw, *ctx.analyse(fw, bw))


def choose(attempt, ctx: "Planning", rewritable, base: Candidate, shared: Candidate | None = None):
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
        _curve_only(attempt, ctx, base)
        return base, [base.row(budget, chosen=True)]
    cands, smallest = [base], [base.peak]
    if shared is not None:
        cands.append(shared)
        smallest.append(shared.peak)
    if "checkpoint" in attempt.passes:
        _checkpoint_candidate(attempt, ctx, base, cands, smallest)
    if rewritable is not None:
        _fewbit_candidates(attempt, ctx, rewritable, shared or base, cands, smallest)
    chosen, exact = choice.choose(cands, budget)
    if chosen is None:
        margin = choice.refusal_margin(attempt.fused, attempt.passes)
        err = BudgetError(min(smallest), budget, margin, hints=attempt.backend.hints(min(smallest), margin),
                          limits=ctx.limits)
        if attempt.backend.strict:
            raise err
        chosen = choice.smallest_peak(cands)
        notes.append(Note(f"does not fit: {err}", None, "kept_smallest"))
        attempt.infeasible.append(str(err))
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


def _curve_only(attempt, ctx: "Planning", base: Candidate) -> None:
    """The report's budget-vs-time curve for a graph that fits unchanged (the plan is not applied)."""
    if attempt.backend.curve_points and "checkpoint" in attempt.passes:
        try:
            plan, _ = plan_checkpoint(attempt, ctx, ctx.joint, base.peak, base.analysis.profile, attempt.backend.curve_points)
            base.curve = plan.frontier
        except (BudgetError, CantApply):
            pass


def _checkpoint_candidate(attempt, ctx: "Planning", base: Candidate, cands: list, smallest: list) -> None:
    try:
        plan, (fw, bw, pair, analysis) = plan_checkpoint(attempt, 
            ctx, ctx.joint, ctx.budget, base.analysis.profile, attempt.backend.curve_points
        )
        c = Candidate(ctx.label("checkpoint"), fw, bw, pair, analysis, plan=plan, joint=ctx.joint, share=ctx.share)
        c.notes.append(checkpoint_note(plan, ctx.budget, analysis))
        c.curve = plan.frontier
        cands.append(c)
    except BudgetError as e:
        smallest.append(e.smallest_peak)
        ctx.limits = e.limits
        ctx.notes.append(Note(
            f"checkpoint: smallest reachable peak {format_bytes(e.smallest_peak)}, over the budget",
            "checkpoint", "does_not_fit",
        ))
        if e.fallback is not None:
            plan, (fw, bw, pair, analysis) = e.fallback
            c = Candidate(
                ctx.label("checkpoint (smallest peak)"), fw, bw, pair, analysis, plan=plan, joint=ctx.joint,
                share=ctx.share, over_budget=True,
            )
            c.curve = plan.frontier
            cands.append(c)
    except CantApply as e:
        ctx.notes.append(e.note("checkpoint"))


def _fewbit_candidates(attempt, ctx: "Planning", rewritable, base: Candidate, cands: list, smallest: list) -> None:
    from memfit.passes import fewbit as fewbit_pass

    by_bits = {}
    for bits in choice.FEWBIT_WIDTHS:
        local: list[str] = []
        got = fewbit(attempt, ctx, fewbit_pass.clone(rewritable), base.bw, base.analysis, local, bits)
        if got is None:
            ctx.notes.extend(local)
            break
        fb_joint, fb_plan, (fw, bw, pair, analysis) = got
        c = Candidate(ctx.label(f"fewbit {bits}-bit"), fw, bw, pair, analysis, fewbit=fb_plan, joint=fb_joint,
                      share=ctx.share, exact=False)
        c.notes.extend(local)
        by_bits[bits] = c
        smallest.append(c.peak)
        if c.peak <= ctx.budget:
            cands.append(c)
            break
    else:
        combo = by_bits.get(attempt.options.fewbit_bits)
        if combo is not None and "checkpoint" in attempt.passes:
            try:
                plan, (fw, bw, pair, analysis) = plan_checkpoint(attempt, ctx, combo.joint, ctx.budget, base.analysis.profile)
                c = Candidate(
                    ctx.label(f"fewbit {combo.fewbit.bits}-bit + checkpoint"), fw, bw, pair, analysis, plan=plan,
                    fewbit=combo.fewbit, joint=combo.joint, share=ctx.share, exact=False,
                )
                c.notes.extend(combo.notes)
                c.notes.append(checkpoint_note(plan, ctx.budget, analysis))
                cands.append(c)
            except BudgetError as e:
                smallest.append(e.smallest_peak)
            except CantApply as e:
                ctx.notes.append(e.note("fewbit", f"fewbit + checkpoint: not applied: {e.reason}"))


def fewbit(attempt, ctx: "Planning", rewritable, baseline_bw, baseline, notes, bits=None):
    """Plan and carry out the few-bit rewrite on ``rewritable`` (a copy of the joint graph); kept only
    where :func:`memfit.planner.choice.fewbit_helps`.

    Returns (joint, plan, (fw, bw, pair, analysis)) or None (the reasons are in ``notes``)."""
    from memfit.passes import checkpoint as ckpt
    from memfit.passes import fewbit as fewbit_pass
    from memfit.planner import fewbit as fewbit_planner

    bits = attempt.options.fewbit_bits if bits is None else bits
    plan = fewbit_planner.plan(rewritable, bits, attempt.options.fewbit_calibration, attempt.options.fewbit_tables)
    for node, reason in plan.skipped:
        notes.append(Note(f"fewbit: {node} left exact: {reason}", "fewbit", "left_exact"))
    if not plan.sites:
        notes.append(Note("fewbit: no activation derivative to rewrite in this graph", "fewbit", "nothing_to_do"))
        return None
    try:
        codes_of = fewbit_pass.apply(rewritable, plan)
        fewbit_pass.decompose(rewritable, fewbit_pass.HELD_BACK if attempt.fused else ())
        if attempt.fused and torch._functorch.config.cse:
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
        f"fewbit: {len(plan.sites)} activation derivative(s) at {plan.bits} bits (approximate gradients"
        f"{', Approx-BP tables for GELU and SiLU' if plan.table_source == 'approx_bp' else ''}), "
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


def split(attempt, fw, bw, num_fwd_outputs, primal_names, params, name, notes, budget=None):
    """Plan the split of ``bw`` into B and W, then carry it out (stashed on ``bw.meta`` for the
    backward compiler); returns the plan, or None with the reason in ``notes`` and the graphs as
    they were. W may recompute forward values instead of holding them only where no ``budget`` binds
    the graph: the checkpoint planner priced the plain split's hand-off, and fewer bytes held between
    B and W can still raise the step's peak (see :func:`memfit.planner.split_backward.plan_split`)."""
    from memfit.passes import split_backward as split_pass
    from memfit.planner import split_backward as split_planner

    try:
        plan = split_planner.plan_split(fw, bw, num_fwd_outputs=num_fwd_outputs, primals=primal_names, params=params,
                                        recompute=None if budget is None else False)
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


__all__ = ["Planning", "checkpoint_note", "choose", "fewbit", "named", "plan_checkpoint", "share_copy", "share_norms", "split"]
