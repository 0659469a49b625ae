"""memfit checkpoint plans vs PyTorch's activation_memory_budget, side by side in one run.

One model (an 8-layer nanoGPT-style GPT by default), Inductor for both. For PyTorch, the step is
measured at several ``torch._functorch.config.activation_memory_budget`` fractions; for memfit at
absolute budgets from "save all" down to below the smallest feasible. For each memfit budget the
table shows the PyTorch fraction whose measured peak is closest, and the ratios of peak and time.

Times in the table are paired: once every configuration is compiled, each memfit step and its
closest PyTorch step run alternately (``--rounds`` times each) and the medians are compared, so a
change of load on the machine during the run hits both sides alike. (Measured one after another,
the same plan's time moved by up to 1.4x between runs on this shared 2-core machine.) No
configuration is recompiled for that: Dynamo's cache limit is raised so every compiled model stays
cached, and the count of compiled graphs is checked before and after.

    python benchmarks/checkpoint_vs_memory_budget.py [--layers 8] [--inner inductor] [--out r.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

import gpt  # noqa: E402

import memfit  # noqa: E402
from memfit import BudgetError  # noqa: E402
from memfit.config import format_bytes  # noqa: E402
from memfit.measurement import measure, paired_times, training_step  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--inner", choices=("inductor", "eager"), default="inductor")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--rounds", type=int, default=7, help="alternating steps per side for the paired times")
    p.add_argument("--out")
    a = p.parse_args()
    # every compiled model stays cached for the paired timing at the end (18 of them by default)
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.accumulated_cache_size_limit = 512
    model, inputs = gpt.factory(batch=4, seq=256, n_layer=a.layers, vocab_size=512)
    print(f"torch {torch.__version__}; GPT {a.layers} layers, 256 wide, batch 4 x 256 tokens; inner={a.inner}")

    steps = {}

    def run(compiled, key):
        step = training_step(compiled, inputs)
        m = measure(step, repeat=a.repeat)
        steps[key] = step
        return m

    torch_rows = []
    for frac in (1.0, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05, 0.0):
        m = run(torch.compile(copy.deepcopy(model), backend=_inductor_at(frac)), ("torch", frac))
        torch_rows.append({"fraction": frac, "peak": m.peak_bytes, "time_ms": m.time_s * 1e3})
        print(f"torch activation_memory_budget={frac:<4}  peak {format_bytes(m.peak_bytes):>11}  {m.time_s * 1e3:7.1f} ms", flush=True)

    save_all = torch_rows[0]["peak"]
    memfit_rows = []
    for frac in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3):
        budget = int(save_all * frac)
        be = memfit.backend(inner=a.inner, budget=budget)
        t0 = time.perf_counter()
        try:
            m = run(torch.compile(copy.deepcopy(model), backend=be), ("memfit", budget))
        except BudgetError as e:
            print(f"memfit budget {format_bytes(budget):>11}: {str(e).splitlines()[0]}", flush=True)
            memfit_rows.append({"budget": budget, "infeasible": True, "smallest_peak": e.smallest_peak})
            continue
        plan = be.records[0].plan
        row = {
            "budget": budget,
            "peak": m.peak_bytes,
            "predicted": be.records[0].peak_bytes,  # Inductor's compiled plan, replayed, where there is one
            "planned": be.records[0].analysis.memory.peak_bytes,  # the planner's FX-level model
            "compiles": 1 + sum(n.count(",") for n in be.records[0].notes if n.startswith("inductor: replayed compiled peaks")),
            "time_ms": m.time_s * 1e3,
            "plan_time_s": plan.plan_time_s if plan else 0.0,
            "compile_and_measure_s": time.perf_counter() - t0,
        }
        memfit_rows.append(row)
        print(
            f"memfit budget {format_bytes(budget):>11}  peak {format_bytes(m.peak_bytes):>11} "
            f"(predicted {format_bytes(row['predicted'])}, planned {format_bytes(row['planned'])}, "
            f"{row['compiles']} compile(s))  {row['time_ms']:7.1f} ms  plan {row['plan_time_s']:.1f} s",
            flush=True,
        )

    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    print(f"\npaired times: {a.rounds} alternating steps of each memfit configuration and its closest PyTorch one", flush=True)
    for r in memfit_rows:
        if r.get("infeasible"):
            continue
        t = min(torch_rows, key=lambda x: abs(x["peak"] - r["peak"]))
        r["closest_fraction"] = t["fraction"]
        mine, theirs = paired_times([steps[("memfit", r["budget"])], steps[("torch", t["fraction"])]], rounds=a.rounds)
        r["paired_ms"], r["paired_torch_ms"] = mine * 1e3, theirs * 1e3
    if torch._dynamo.utils.counters["stats"]["unique_graphs"] != graphs:
        print("WARNING: a configuration was recompiled during the paired timing; its times are not comparable")

    print()
    print("| memfit budget | memfit peak | peak/budget | predicted/measured | closest torch fraction | torch peak | peak ratio (memfit/torch) | memfit ms (paired) | torch ms (paired) | time ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in memfit_rows:
        if r.get("infeasible"):
            print(f"| {format_bytes(r['budget'])} | infeasible (smallest {format_bytes(r['smallest_peak'])}) | | | | | | | | |")
            continue
        t = next(x for x in torch_rows if x["fraction"] == r["closest_fraction"])
        print(
            f"| {format_bytes(r['budget'])} | {format_bytes(r['peak'])} | {r['peak'] / r['budget']:.3f} | "
            f"{r['predicted'] / r['peak']:.3f} | {t['fraction']} | {format_bytes(t['peak'])} | "
            f"{r['peak'] / t['peak']:.3f} | {r['paired_ms']:.1f} | {r['paired_torch_ms']:.1f} | "
            f"{r['paired_ms'] / r['paired_torch_ms']:.3f} |"
        )
    lowest_torch = min(torch_rows, key=lambda x: x["peak"])
    feasible = [r for r in memfit_rows if not r.get("infeasible")]
    if feasible:
        low = min(feasible, key=lambda r: r["peak"])
        mine, theirs = paired_times([steps[("memfit", low["budget"])], steps[("torch", lowest_torch["fraction"])]], rounds=a.rounds)
        print(
            f"\nlowest memfit peak {format_bytes(low['peak'])} vs lowest torch peak {format_bytes(lowest_torch['peak'])} "
            f"at fraction {lowest_torch['fraction']}: {100 * (1 - low['peak'] / lowest_torch['peak']):.0f}% lower, "
            f"{mine * 1e3:.1f} ms vs {theirs * 1e3:.1f} ms paired (time ratio {mine / theirs:.3f})"
        )
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"torch": torch_rows, "memfit": memfit_rows}, f, indent=1)


def _inductor_at(fraction: float):
    """Inductor (as ``torch.compile``'s default backend) with ``activation_memory_budget=fraction`` while
    it partitions. A backend object of its own per fraction: Dynamo keeps one cache entry per backend,
    so all the fractions' compiled models stay cached side by side (with ``torch.compile(m)`` for
    each, the second fraction reused the first one's graphs)."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        with torch._functorch.config.patch(activation_memory_budget=fraction):
            return compile_fx(gm, example_inputs)

    return backend


if __name__ == "__main__":
    main()
