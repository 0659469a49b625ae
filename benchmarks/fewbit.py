"""Few-bit activation gradients: memory effect, gradient error, convergence — measured in one run.

1. Memory: a GPT-2-style model (GELU MLP), the same GPT with SiLU, and an HF Llama (SwiGLU, SiLU),
   each with inner=eager and inner=inductor, unrewritten vs 2-bit codes: measured peak, predicted
   peak, and the measured fall against the predicted fall.
2. Gradient error: for every activation and bit width, the relative L2 error of the input gradient
   against the exact one on standard-normal inputs (through the memfit ops), beside the table's.
3. Convergence: a nanoGPT-style GPT trained on a fixed generated corpus, exact vs 2-bit vs 3-bit
   GELU codes, and 2-bit with Approx-BP's ReGELU2 table; the same GPT with SiLU, exact vs 2-bit optimal
   vs Approx-BP's ReSiLU2 (same seed, same batches): held-out losses at the end and measured peaks.

    python benchmarks/fewbit.py [--steps 300] [--out results.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

import gpt  # noqa: E402
import hf_llama  # noqa: E402

import memfit  # noqa: E402
from memfit.config import format_bytes  # noqa: E402
from memfit.kernels import fewbit as K  # noqa: E402
from memfit.kernels import fewbit_tables as T  # noqa: E402
from memfit.measurement import measure, training_step  # noqa: E402

MiB = 2**20


def _silu_gpt(**kw):
    model, inputs = gpt.factory(**kw)
    for block in model.h:
        block.mlp.gelu = nn.SiLU()
    return model, inputs


MODELS = {
    "gpt2-gelu": lambda: gpt.factory(batch=4, seq=256, n_layer=4, vocab_size=512),
    "gpt-silu": lambda: _silu_gpt(batch=4, seq=256, n_layer=4, vocab_size=512),
    "llama-swiglu": lambda: hf_llama.factory(
        batch=2, seq=256, vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4,
    ),
}


def memory_rows(repeat: int) -> list[dict]:
    rows = []
    print("\n1. memory: unrewritten vs 2-bit codes (measured = allocator peak of one training step)")
    print(f"{'model':13} {'inner':9} {'base meas':>10} {'fewbit meas':>12} {'base pred':>10} {'fewbit pred':>12} "
          f"{'fall meas':>10} {'fall pred':>10} {'meas/pred':>9} {'sites':>6} {'time x':>7}")
    for name, factory in MODELS.items():
        model, inputs = factory()
        args, kwargs = ((), inputs) if isinstance(inputs, dict) else (tuple(inputs), {})
        for inner in ("eager", "inductor"):
            res = {}
            for passes in ((), ("fewbit",)):
                torch._dynamo.reset()
                be = memfit.backend(inner=inner, passes=passes, fewbit_bits=2)
                m = measure(training_step(torch.compile(copy.deepcopy(model), backend=be), args, kwargs), repeat=repeat)
                res[passes] = (m, be.step_analysis().memory.peak_bytes, be)
            (m0, p0, _), (m1, p1, be) = res[()], res[("fewbit",)]
            plans = [r.fewbit for r in be.records if r.fewbit is not None]
            sites = [s for p in plans for s in p.sites]
            notes = [n for r in be.records for n in r.notes if n.startswith("fewbit: not applied") or "left exact" in n]
            fall_m, fall_p = m0.peak_bytes - m1.peak_bytes, p0 - p1
            row = {
                "model": name, "inner": inner, "base_peak": m0.peak_bytes, "fewbit_peak": m1.peak_bytes,
                "base_pred": p0, "fewbit_pred": p1, "fall_measured": fall_m, "fall_predicted": fall_p,
                "sites": len(sites), "site_ratios": sorted({round(s.saved_bytes / s.code_bytes, 2) for s in sites}),
                "time_ratio": m1.time_s / m0.time_s, "notes": notes[:3],
            }
            rows.append(row)
            ratio = f"{fall_m / fall_p:9.3f}" if fall_p else f"{'-':>9}"
            print(f"{name:13} {inner:9} {m0.peak_bytes / MiB:9.2f}M {m1.peak_bytes / MiB:11.2f}M {p0 / MiB:9.2f}M "
                  f"{p1 / MiB:11.2f}M {fall_m / MiB:9.2f}M {fall_p / MiB:9.2f}M {ratio} {len(sites):6d} "
                  f"{m1.time_s / m0.time_s:7.2f}", flush=True)
            for n in notes[:2]:
                print(f"{'':23}{n[:150]}")
    return rows


def error_rows() -> list[dict]:
    print("\n2. relative L2 error of the input gradient, standard-normal inputs (measured through the ops / table's)")
    fns = {
        "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu,
        "sigmoid": torch.sigmoid, "tanh": torch.tanh, "softplus": F.softplus, "elu": F.elu, "mish": F.mish,
        "relu": F.relu, "leaky_relu": F.leaky_relu,
    }
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1 << 20, generator=gen).requires_grad_(True)
    g = torch.randn(1 << 20, generator=gen)
    rows = []
    print(f"{'activation':11} " + " ".join(f"{b}-bit meas/table".rjust(20) for b in T.BITS))
    for kind, fn in fns.items():
        (exact,) = torch.autograd.grad(fn(x), x, g)
        cells = []
        for bits in T.BITS:
            t = T.table(kind, bits)
            codes = torch.ops.memfit.fewbit_pack(x.detach(), list(t.boundaries), bits)
            approx = torch.ops.memfit.fewbit_grad(g, codes, list(t.levels), bits)
            err = float((approx - exact).norm() / exact.norm())
            rows.append({"activation": kind, "bits": bits, "measured": err, "table": t.rel_error})
            cells.append(f"{100 * err:8.2f}% / {100 * t.rel_error:6.2f}%")
        print(f"{kind:11} " + " ".join(c.rjust(20) for c in cells))
    print("Approx-BP's 2-bit tables (fewbit_tables='approx_bp'), the same inputs:")
    for kind in T.APPROX_BP:
        (exact,) = torch.autograd.grad(fns[kind](x), x, g)
        t = T.table(kind, 2, source="approx_bp")
        codes = torch.ops.memfit.fewbit_pack(x.detach(), list(t.boundaries), 2)
        approx = torch.ops.memfit.fewbit_grad(g, codes, list(t.levels), 2)
        err = float((approx - exact).norm() / exact.norm())
        rows.append({"activation": kind, "bits": 2, "tables": "approx_bp", "measured": err, "table": t.rel_error})
        print(f"{kind:11} {f'{100 * err:8.2f}% / {100 * t.rel_error:6.2f}%'.rjust(20)}  "
              f"(optimal 2-bit: {100 * T.table(kind, 2).rel_error:.2f}%)")
    return rows


def corpus(n: int = 200_000, vocab: int = 32, seed: int = 0) -> torch.Tensor:
    """A fixed token stream from a random first-order Markov chain with a few likely successors per
    token (about 1.2 nats per token at best, against log(32) = 3.47 for guessing): learnable in a few
    hundred steps, generated here so no file is needed."""
    gen = torch.Generator().manual_seed(seed)
    cdf = (torch.randn(vocab, vocab, generator=gen) * 3.0).softmax(-1).cumsum(-1)
    u = torch.rand(n, generator=gen)
    out = [0]
    for i in range(1, n):
        out.append(min(int(torch.searchsorted(cdf[out[-1]], u[i])), vocab - 1))
    return torch.tensor(out)


def _batch(data: torch.Tensor, gen: torch.Generator, batch: int = 16, seq: int = 64):
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
    x = torch.stack([data[s : s + seq] for s in starts])
    y = torch.stack([data[s + 1 : s + seq + 1] for s in starts])
    return x, y


def train(bits: int | None, data: torch.Tensor, steps: int, vocab: int, tables: str = "optimal",
          act: str = "gelu") -> dict:
    torch.manual_seed(0)
    cfg = gpt.GPTConfig(vocab_size=vocab, block_size=64, n_layer=2, n_head=4, n_embd=128)
    model = gpt.GPT(cfg)
    if act == "silu":
        for block in model.h:
            block.mlp.gelu = nn.SiLU()
    passes = ("fewbit",) if bits else ()
    be = memfit.backend(passes=passes, fewbit_bits=bits or 2, fewbit_tables=tables)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=be)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = _batch(data, gen)
        loss = compiled(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    elapsed = time.perf_counter() - t0
    held_out = torch.Generator().manual_seed(2)
    with torch.no_grad():  # the same held-out batches for every run, exact forward
        final = sum(model(*_batch(data, held_out, batch=64)).item() for _ in range(8)) / 8
    peak = measure(training_step(compiled, (x, y)), repeat=1).peak_bytes
    sites = sum(len(r.fewbit.sites) for r in be.records if r.fewbit is not None)
    return {"bits": bits, "tables": tables, "act": act, "losses": losses, "final": final, "peak": peak,
            "time_s": elapsed, "sites": sites}


def convergence(steps: int) -> list[dict]:
    print(f"\n3. convergence: nanoGPT (2 layers, 128 wide), {steps} AdamW steps on a generated corpus, inductor")
    vocab = 32
    data = corpus(vocab=vocab)
    settings = [(None, "optimal", "gelu"), (2, "optimal", "gelu"), (2, "approx_bp", "gelu"), (3, "optimal", "gelu"),
                (None, "optimal", "silu"), (2, "optimal", "silu"), (2, "approx_bp", "silu")]
    runs = [train(bits, data, steps, vocab, tables, act) for bits, tables, act in settings]
    exact = {r["act"]: r["final"] for r in runs if r["bits"] is None}
    for r in runs:
        label = (f"exact {r['act'].upper()}" if r["bits"] is None
                 else f"{r['bits']}-bit {r['act'].upper()}{' Approx-BP' if r['tables'] == 'approx_bp' else ''}")
        rel = (r["final"] - exact[r["act"]]) / exact[r["act"]]
        print(f"{label:20} held-out loss {r['final']:.4f}  vs exact {100 * rel:+6.2f}%  "
              f"peak {format_bytes(r['peak'])}  coded sites {r['sites']}  {r['time_s']:.1f} s", flush=True)
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--skip", nargs="*", default=(), choices=("memory", "error", "convergence"))
    p.add_argument("--out")
    a = p.parse_args()
    print(f"torch {torch.__version__}; CPU; kernels: torch reference (Triton on CUDA tensors)")
    out = {}
    if "memory" not in a.skip:
        out["memory"] = memory_rows(a.repeat)
    if "error" not in a.skip:
        out["error"] = error_rows()
    if "convergence" not in a.skip:
        out["convergence"] = convergence(a.steps)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
