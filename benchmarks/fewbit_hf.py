"""Few-bit on Hugging Face activation chains (``gelu_new``, ``gelu_fast``, ``gelu_python``, ``quick_gelu``, ...).

1. Gradient error: each ``ACT2FN`` chain compiled with ``passes=["fewbit"]`` (inner=eager) on
   standard-normal inputs (256 x 256), the relative L2 error of the input gradient against eager's
   exact one at 1-4 bits, beside the table's own figure.
2. Bytes: HF GPT-2 (``gelu_new``; 2 layers, hidden 64, 2 x 32 tokens) compiled whole with
   ``labels=`` under each inner: sites, saved bytes and predicted peak without and with 2-bit codes.

    python benchmarks/fewbit_hf.py
"""

from __future__ import annotations

import torch
import transformers
from transformers.activations import ACT2FN

import memfit
from memfit.kernels import fewbit_tables as T

CHAINS = {"gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_accurate": "gelu_tanh", "gelu_python": "gelu",
          "quick_gelu": "quick_gelu"}


def gradient_errors() -> None:
    print("| activation | table | bits | measured error | table's figure |")
    print("|---|---|---:|---:|---:|")
    torch.manual_seed(0)
    n = 256
    w0, g, eye = torch.randn(n, n), torch.randn(n, n), torch.eye(n)
    for name, kind in CHAINS.items():
        act = ACT2FN[name]
        for bits in T.BITS:
            torch._dynamo.reset()
            be = memfit.backend(passes=["fewbit"], inner="eager", fewbit_bits=bits)
            w = w0.clone().requires_grad_()
            torch.compile(lambda w, act=act: (act(eye @ w) * g).sum(), backend=be)(w).backward()
            ref = w0.clone().requires_grad_()
            (act(eye @ ref) * g).sum().backward()
            (site,) = be.records[0].fewbit.sites
            assert site.kind == kind
            err = ((w.grad - ref.grad).norm() / ref.grad.norm()).item()
            print(f"| {name} | {kind} | {bits} | {100 * err:.1f}% | {100 * site.rel_error:.1f}% |")


def gpt2_bytes() -> None:
    print()
    print("| inner | sites | saved exact | saved 2-bit | fall | peak exact | peak 2-bit |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for inner in ("eager", "inductor"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(cfg)
        ids = torch.randint(0, 256, (2, 32))
        be = memfit.backend(passes=["fewbit"], inner=inner)
        torch.compile(lambda ids, model=model: model(input_ids=ids, labels=ids).loss, backend=be)(ids).backward()
        rec = next(r for r in be.records if r.fewbit is not None)
        b, a = rec.before.memory, rec.analysis.memory
        print(f"| {inner} | {len(rec.fewbit.sites)} x {rec.fewbit.sites[0].kind} | {b.saved_bytes} | {a.saved_bytes} | "
              f"{b.saved_bytes - a.saved_bytes} | {b.peak_bytes} | {a.peak_bytes} |")
        for note in rec.notes:
            if note.technique == "fewbit":
                print(f"  {note}")


if __name__ == "__main__":
    gradient_errors()
    gpt2_bytes()
