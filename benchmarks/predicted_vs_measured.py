"""Predicted vs measured step peak, side by side in one run.

For each reference model (GELU MLP stack, nanoGPT-style GPT, HF Llama from a small config) it runs
one training step four ways and measures the allocator's peak above resident memory and the median
step time: plain eager (no compile), ``torch.compile`` default (Inductor), and memfit with the eager
and the Inductor inner compilers. For the memfit runs it prints the memory model's prediction and
the ratio measured / predicted, and the cost model's roofline estimate of the step time (on a
CPU the profile is calibrated by a microbenchmark, so the estimate is a lower bound that ignores
Python and dispatch overheads beyond a fixed per-op cost).

    python benchmarks/predicted_vs_measured.py                 # CPU
    python benchmarks/predicted_vs_measured.py --device cuda   # on a GPU, if there is one
    python benchmarks/predicted_vs_measured.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

import memfit  # noqa: E402
from memfit.config import format_bytes  # noqa: E402
from memfit.measurement import measure, training_step  # noqa: E402


def models(size: str):
    import gpt
    import hf_llama
    import mlp

    if size == "small":
        yield "gelu-mlp", *_split(mlp.factory(batch=512, width=256, depth=4))
        yield "gpt", *_split(gpt.factory(batch=2, seq=256, n_layer=2))
        yield "hf-llama", *_split(hf_llama.factory(batch=2, seq=256))
    else:
        yield "gelu-mlp", *_split(mlp.factory(batch=4096, width=1024, depth=8))
        yield "gpt", *_split(gpt.factory(batch=8, seq=512, n_layer=6, n_embd=512, n_head=8))
        yield "hf-llama", *_split(hf_llama.factory(batch=4, seq=512, hidden_size=512, intermediate_size=1376, num_hidden_layers=6))


def _split(made):
    model, inputs = made[:2]
    return (model, (), inputs) if isinstance(inputs, dict) else (model, tuple(inputs), {})


def run(device: str, size: str, repeat: int) -> list[dict]:
    rows = []
    for name, model, args, kwargs in models(size):
        model = model.to(device)
        args = tuple(a.to(device) for a in args)
        kwargs = {k: v.to(device) for k, v in kwargs.items()}
        configs = [
            ("eager (no compile)", model, None),
            ("torch.compile inductor", torch.compile(model), None),
        ]
        for inner in ("eager", "inductor"):
            be = memfit.backend(inner=inner, device="cpu" if device == "cpu" else None)
            configs.append((f"memfit inner={inner}", torch.compile(model, backend=be), be))
        for label, m, be in configs:
            torch._dynamo.reset()
            meas = measure(training_step(m, args, kwargs), device=device, repeat=repeat)
            row = {"model": name, "config": label, "measured_peak": meas.peak_bytes, "time_ms": meas.time_s * 1e3}
            if be is not None:
                analysis = be.step_analysis()
                predicted = analysis.memory.peak_bytes
                row["predicted_peak"] = predicted
                row["ratio"] = meas.peak_bytes / predicted
                row["roofline_ms"] = analysis.time_s * 1e3
            rows.append(row)
            print(_fmt(row), flush=True)
    return rows


def _fmt(r: dict) -> str:
    pred = format_bytes(r["predicted_peak"]) if "predicted_peak" in r else "-"
    ratio = f"{r['ratio']:.3f}" if "ratio" in r else "-"
    roof = f"{r['roofline_ms']:.1f}" if "roofline_ms" in r else "-"
    return (
        f"| {r['model']:<9} | {r['config']:<23} | {format_bytes(r['measured_peak']):>11} | {pred:>11} | "
        f"{ratio:>6} | {r['time_ms']:>7.1f} | {roof:>7} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", choices=("small", "large"), default="small")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", help="write the rows as JSON here")
    a = p.parse_args()
    print(f"torch {torch.__version__}, device {a.device}, size {a.size}")
    print("| model | config | measured peak | predicted peak | measured/predicted | ms/step | roofline ms |")
    print("|---|---|---:|---:|---:|---:|---:|")
    rows = run(a.device, a.size, a.repeat)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": a.device, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
