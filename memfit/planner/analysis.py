"""Step analysis: the memory model plus FLOPs and roofline time per node, in one object.

This is what the planner reads and what ``memfit analyze`` prints. It is computed from the
partitioned forward and backward graphs only (FakeTensor metadata), so it costs no device memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from memfit.units import format_bytes
from memfit.planner.cost import DeviceProfile, get_profile, node_flops, node_time, node_vals, resolve_op_models
from memfit.planner.memory import GraphPair, MemoryModel, simulate


@dataclass(frozen=True)
class NodeCost:
    graph: str
    node: str
    target: str
    flops: int
    time_s: float


@dataclass
class StepAnalysis:
    memory: MemoryModel
    costs: list[NodeCost]
    profile: DeviceProfile
    param_bytes: int | None = None
    """Bytes of the model's parameters, where the caller knows which inputs are parameters."""
    num_graphs: int = 1
    notes: list[str] = field(default_factory=list)
    plans: list = field(default_factory=list)
    """Checkpoint plans carried out in these graphs (memfit.planner.checkpoint.CheckpointPlan)."""
    fewbit_plans: list = field(default_factory=list)
    """Few-bit plans carried out in these graphs (memfit.planner.fewbit.FewbitPlan)."""
    before: "StepAnalysis | None" = None
    """The same step with no memfit pass (the baseline partition), where a plan changed it: ``format``
    then prints the two side by side."""

    @property
    def flops(self) -> int:
        return sum(c.flops for c in self.costs)

    @property
    def forward_flops(self) -> int:
        return sum(c.flops for c in self.costs if c.graph.endswith(".fw"))

    @property
    def time_s(self) -> float:
        return sum(c.time_s for c in self.costs)

    def to_json(self, top: int = 10) -> dict:
        m = self.memory
        peak = m.peak_point
        return {
            "device_profile": self.profile.name,
            "num_graphs": self.num_graphs,
            "param_bytes": self.param_bytes,
            "saved_activation_bytes": m.saved_bytes,
            "predicted_peak_bytes": m.peak_bytes,
            "peak_at": {"graph": peak.graph, "node": peak.node} if peak else None,
            "flops": self.flops,
            "forward_flops": self.forward_flops,
            "estimated_time_s": self.time_s,
            "largest_saved": [
                {
                    "name": b.producer,
                    "graph": b.graph,
                    "bytes": b.nbytes,
                    "saved_as": b.saved_as,
                    "module": b.module,
                    "source": b.source,
                    "live_at_peak": b.live_at(m.peak_step),
                }
                for b in m.saved[:top]
            ],
            "timeline": [[p.graph, p.node, p.live_bytes, p.after_free] for p in m.timeline],
            "notes": list(self.notes),
            "checkpoint_plans": [p.to_json() for p in self.plans],
            "fewbit_plans": [p.to_json() for p in self.fewbit_plans],
            **({"before": {"saved_activation_bytes": self.before.memory.saved_bytes,
                           "predicted_peak_bytes": self.before.memory.peak_bytes,
                           "estimated_time_s": self.before.time_s}} if self.before is not None else {}),
        }

    def format(self, top: int = 10, title: str | None = None) -> str:
        m = self.memory
        peak = m.peak_point
        lines = []
        if title:
            lines.append(title)
        if self.param_bytes is not None:
            lines.append(f"parameters          {format_bytes(self.param_bytes):>12}")
        where = f"  (at {peak.graph} {peak.node})" if peak else ""
        b = self.before
        if b is None:
            lines.append(f"saved activations   {format_bytes(m.saved_bytes):>12}")
            lines.append(f"predicted peak      {format_bytes(m.peak_bytes):>12}{where}  above resident memory")
        else:  # planned: the step without the plan beside it (the planned figure alone misled)
            lines.append(f"{'':20}{'without memfit':>14}  {'planned':>12}")
            lines.append(f"saved activations   {format_bytes(b.memory.saved_bytes):>14}  {format_bytes(m.saved_bytes):>12}")
            lines.append(f"predicted peak      {format_bytes(b.memory.peak_bytes):>14}  {format_bytes(m.peak_bytes):>12}"
                         f"{where}  above resident memory")
        lines.append(
            f"FLOPs               {self.flops / 1e9:>12.3f} GFLOP  (forward {self.forward_flops / 1e9:.3f})"
        )
        if b is None:
            t = f"{self.time_s:>12.3f} s " if self.time_s >= 1 else f"{self.time_s * 1e3:>12.3f} ms"
            lines.append(f"estimated time      {t}  on the {self.profile.name} profile (roofline)")
        else:
            lines.append(f"estimated time      {1e3 * b.time_s:>11.3f} ms  {1e3 * self.time_s:>9.3f} ms"
                         f"  ({100 * (self.time_s / b.time_s - 1) if b.time_s else 0:+.0f}%) on the {self.profile.name} "
                         "profile (roofline)")
        if self.num_graphs != 1:
            lines.append(f"graphs              {self.num_graphs:>12}")
        saved = m.saved[:top]
        if saved:
            lines.append("")
            lines.append(f"{len(saved)} largest saved activations (* = live at the peak):")
            w = max(len(b.producer) for b in saved)
            for b in saved:
                star = "*" if b.live_at(m.peak_step) else " "
                where = " ".join(x for x in (b.module, b.source) if x) or "(no source recorded)"
                lines.append(f" {star} {format_bytes(b.nbytes):>12}  {b.producer:<{w}}  {where}")
        for plan in self.plans:
            lines.append("")
            lines.append(
                f"checkpoint plan aiming at {format_bytes(plan.budget)}: predicted peak "
                f"{format_bytes(plan.predicted_peak)}, +{plan.recompute_time_s * 1e3:.3f} ms recompute "
                f"({self.profile.name} roofline), planned in {plan.plan_time_s:.1f} s"
            )
            lines.append(f"  saved ({len(plan.saved)}, {format_bytes(plan.saved_bytes)}): {_names(plan.saved)}")
            lines.append(f"  recomputed in the backward ({len(plan.recomputed)}): {_names(plan.recomputed)}")
        for fb in self.fewbit_plans:
            lines.append("")
            lines.append(
                f"few-bit plan ({fb.bits} bits, approximate gradients{', calibrated' if fb.calibrated else ''}): "
                f"{len(fb.sites)} activation(s), {format_bytes(fb.bytes_saved)} less saved"
            )
            for site in fb.sites:
                where = " ".join(x for x in (site.module, site.source) if x) or site.backward
                lines.append(
                    f"  {site.kind:<10} {format_bytes(site.saved_bytes):>11} -> {format_bytes(site.code_bytes):>11}  "
                    f"grad error {100 * site.rel_error:4.1f}%  {where}"
                )
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)


def analyze_pairs(
    pairs: list[GraphPair],
    *,
    device: str | None = None,
    param_bytes: int | None = None,
    fused: bool = False,
    buffer_plans: dict | None = None,
    op_models=None,
) -> StepAnalysis:
    """Memory model, FLOPs and roofline times of one step made of ``pairs`` (forward order).

    ``fused``: the graphs run under a fusing compiler (Inductor), see ``memory.fused_away``.
    ``buffer_plans``: Inductor's buffer plans of graphs it compiled (``memory.simulate``).
    ``op_models``: ``{op: OpModel}`` of opaque ops (see :mod:`memfit.kernels`), given to both the memory
    and the time model so they price the same ops the same way; ``None``: the kernels' table.
    """
    op_models = resolve_op_models(op_models)
    example_device = None
    for n in pairs[0].forward.graph.nodes:
        vals = node_vals(n)
        if vals and vals[0].device.type != "meta":
            example_device = vals[0].device
            break
    profile = get_profile(device, example_device)
    memory = simulate(pairs, granularity=profile.alloc_granularity, fused=fused, buffer_plans=buffer_plans,
                      op_models=op_models)
    costs = []
    for p in pairs:
        for tag, gm in ((f"{p.name}.fw", p.forward), (f"{p.name}.bw", p.backward)):
            if gm is None:
                continue
            for n in gm.graph.nodes:
                if n.op == "call_function":
                    costs.append(NodeCost(tag, n.name, str(n.target), node_flops(n), node_time(n, profile, op_models)))
    notes = []
    if memory.unmatched:
        notes.append(
            f"backward inputs {memory.unmatched[:4]} match no saved forward value by name; counted as "
            "allocated from the start of the backward"
        )
    return StepAnalysis(memory, costs, profile, param_bytes=param_bytes, num_graphs=len(pairs), notes=notes)


def _names(names, k: int = 12) -> str:
    names = sorted(names, key=lambda x: (len(x), x))
    more = f" ... (+{len(names) - k})" if len(names) > k else ""
    return ", ".join(names[:k]) + more
