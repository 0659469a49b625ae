"""passes="auto" across a sweep of budgets, against each single technique at the same budget, in one run.

For each model (a nanoGPT-style GPT and an HF Llama built from a small config; Inductor), the step is
measured compiled plainly (torch.compile), then at budgets from the smallest feasible to unconstrained with:

* memfit ``passes="auto"`` with ``allow_approximation=True`` (the planner may choose few-bit);
* memfit ``passes=["checkpoint"]`` (activation checkpointing alone);
* memfit ``passes=["fewbit"]`` (few-bit activation gradients alone: they fit or they do not).

The table gives auto's choice, measured peak against the budget, and its step time against the fastest
single technique whose measured peak fits the same budget (+2%). Those times are paired: once a
budget's configurations are compiled, their steps run alternately (``--rounds`` each) and the medians
are compared, so a change of load on this shared machine hits all of them alike (one after another,
the same graphs' times differed by up to 1.39x).

    python benchmarks/auto_planner.py [--models gpt,llama] [--budgets 6] [--repeat 3] [--out r.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

import gpt  # noqa: E402
import hf_llama  # noqa: E402

import memfit  # noqa: E402
from memfit import BudgetError  # noqa: E402
from memfit.planner.choice import INDUCTOR_PLAN_MARGIN  # noqa: E402
from memfit.config import format_bytes  # noqa: E402
from memfit.measurement import measure, paired_times, training_step  # noqa: E402
from memfit.trace import trace_step  # noqa: E402

MODELS = {
    "gpt": ("nanoGPT-style GPT, 4 layers, 256 wide, batch 4 x 256, vocab 4096",
            lambda: gpt.factory(batch=4, seq=256, n_layer=4, vocab_size=4096)),
    "llama": ("HF Llama, 4 layers, 256 wide, GQA 8/4, batch 2 x 256, vocab 4096", lambda: hf_llama.factory()),
}


def _split(inputs):
    return ((), inputs) if isinstance(inputs, dict) else (tuple(inputs), {})


def smallest_feasible(factory) -> int:
    """The smallest predicted peak memfit can plan for (fake tensors; no plan is compiled)."""
    from memfit.planner import choice

    choice.REFUSE_BELOW_FLOOR = False  # plan below the step's floor: the smallest-peak plan is what is wanted
    be, _ = trace_step(factory, budget=1, strict=False, inner="inductor", allow_approximation=True)
    return min(c["peak"] for r in be.records for c in r.candidates)


def run_model(key: str, budgets_n: int, repeat: int, rounds: int = 7) -> list[dict]:
    desc, factory = MODELS[key]
    model, inputs = factory()
    args, kwargs = _split(inputs)
    print(f"\n== {key}: {desc}", flush=True)

    steps = {}

    def measured(backend, key=None):
        m = copy.deepcopy(model)
        compiled = torch.compile(m, backend=backend) if backend is not None else torch.compile(m)
        step = training_step(compiled, args, kwargs)
        steps[key] = step
        return measure(step, repeat=repeat)

    torch._dynamo.reset()
    base = measured(None)
    print(f"plain torch.compile: {base}", flush=True)
    lo = smallest_feasible(factory) / INDUCTOR_PLAN_MARGIN * 1.01
    hi = base.peak_bytes
    budgets = [int(lo + (hi - lo) * i / (budgets_n - 1)) for i in range(budgets_n)] + [None]
    rows = []
    hdr = f"{'budget':>11} | {'auto chose':<22} {'peak':>10} {'/budget':>7} {'time':>9} | {'best single':<11} {'time':>9} | {'auto/best':>9}"
    print(hdr)
    print("-" * len(hdr), flush=True)
    for budget in budgets:
        torch._dynamo.reset()  # one budget's configurations stay compiled together, for the paired times
        steps.clear()
        row = {"budget": budget}
        configs = {
            "auto": dict(passes="auto", allow_approximation=True),
            "checkpoint": dict(passes=["checkpoint"]),
            "fewbit": dict(passes=["fewbit"]),
        }
        for name, opts in configs.items():
            be = memfit.backend(budget=budget, inner="inductor", **opts)
            try:
                m = measured(be, name)
            except BudgetError as e:
                row[name] = {"error": str(e).splitlines()[0][:160]}
                continue
            rec = be.records[-1]
            chosen = next((c["label"] for c in rec.candidates if c["chosen"]), rec.partition)
            row[name] = {
                "peak": m.peak_bytes,
                "time_s": m.time_s,
                "fits": budget is None or m.peak_bytes <= 1.02 * budget,
                "chose": chosen,
                "predicted_peak": rec.peak_bytes,  # replayed from Inductor's buffer plans where compiled
                "planned_peak": rec.analysis.memory.peak_bytes,
            }
        a = row["auto"]
        singles = [(n, row[n]) for n in ("checkpoint", "fewbit") if "peak" in row[n] and row[n]["fits"]]
        if "peak" in a and singles:
            paired = paired_times([steps["auto"]] + [steps[n] for n, _ in singles], rounds=rounds)
            a["paired_s"] = paired[0]
            for (n, r), t in zip(singles, paired[1:]):
                r["paired_s"] = t
        best = min(singles, key=lambda x: x[1].get("paired_s", x[1]["time_s"]), default=None)
        row["best_single"] = best[0] if best else None
        bud = format_bytes(budget) if budget else "none"
        if "peak" not in a:
            print(f"{bud:>11} | auto: {a['error']}")
        else:
            ratio = f"{a['paired_s'] / best[1]['paired_s']:.3f}" if best else "—"
            rel = f"{a['peak'] / budget:.3f}" if budget else "—"
            print(
                f"{bud:>11} | {a['chose']:<22} {format_bytes(a['peak']):>10} {rel:>7} {a.get('paired_s', a['time_s']) * 1e3:7.1f}ms | "
                f"{(best[0] if best else 'none fits'):<11} {(best[1]['paired_s'] * 1e3 if best else float('nan')):7.1f}ms | {ratio:>9}",
                flush=True,
            )
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="gpt,llama")
    p.add_argument("--budgets", type=int, default=6, help="budgets between the smallest feasible and the unplanned peak")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--rounds", type=int, default=7, help="alternating steps per configuration for the paired times")
    p.add_argument("--out")
    a = p.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; inner=inductor; peaks: allocator, above resident")
    out = {k: run_model(k, a.budgets, a.repeat, a.rounds) for k in a.models.split(",")}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
