"""Hugging Face models compiled whole, against the tools HF users pick, side by side in one run.

Every configuration trains the same model (a copy of one initialisation) the way users call it:
``out = model(input_ids=ids, labels=ids); out.loss.backward()``, the output held until the backward is
done. Configurations:

* ``compile``: plain ``torch.compile(model)`` (Inductor);
* ``hf_checkpointing``: ``model.gradient_checkpointing_enable()``, then ``torch.compile(model)``;
* ``memory_budget``: ``torch._functorch.config.activation_memory_budget = 0.5`` (PyTorch's own
  checkpoint planner) with ``torch.compile(model)``;
* ``auto_chunker``: Inductor's ``auto_chunker`` on, ``torch.compile(model)``;
* ``auto_chunker_loss``: the same peer at its best, on a function that returns the loss alone (so the
  logits are not an output);
* ``memfit=F``: ``memfit.hf.compile(model, budget=F x compile's measured peak)``.

With ``--checkpointing`` every configuration runs with ``model.gradient_checkpointing_enable()`` (the
users who turn it on to fit, and then compile), and ``hf_checkpointing`` is left out.

Peaks are the allocator's (``memfit.measure``); times are paired (every configuration stays compiled,
one step of each per round, medians), so a change of load on a shared machine hits them alike.

    python benchmarks/hf.py [--family qwen2] [--layers 2] [--width 128] [--vocab 32768] [--tokens 4096]
                            [--fractions 0.8,0.6,0.4,0.2] [--configs ...] [--dropout 0] [--checkpointing]
                            [--rounds 5] [--out hf.md]

Targets (issue 20), on a logits-heavy step (vocabulary >= 32k, >= 4k tokens): memfit's peak <= 0.2x
plain ``torch.compile``'s at <= 1.15x its time, and at least 2x below ``auto_chunker``'s peak at no
more time.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import memfit  # noqa: E402
import memfit.hf  # noqa: E402
from memfit.units import format_bytes  # noqa: E402
from memfit.measurement import measure, paired_times, training_step  # noqa: E402

FAMILIES = ("qwen2", "llama", "gpt2", "gemma2", "phi3")
PEERS = ("compile", "hf_checkpointing", "memory_budget", "auto_chunker", "auto_chunker_loss")


def build(family: str, layers: int, width: int, vocab: int, tokens: int, dropout: float = 0.0) -> torch.nn.Module:
    """A causal LM of ``family`` from a small config (dropout off unless ``dropout``: then GPT-2's three
    dropouts, the others' attention dropout), in training mode."""
    import transformers as t

    torch.manual_seed(0)
    heads = max(1, width // 32)
    common = dict(vocab_size=vocab, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                  num_attention_heads=heads, max_position_embeddings=max(tokens, 2048), attention_dropout=dropout)
    if family == "gpt2":
        model = t.GPT2LMHeadModel(t.GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=heads,
                                               n_positions=max(tokens, 1024), resid_pdrop=dropout, embd_pdrop=dropout,
                                               attn_pdrop=dropout))
    elif family == "qwen2":
        model = t.Qwen2ForCausalLM(t.Qwen2Config(num_key_value_heads=heads, **common))
    elif family == "llama":
        model = t.LlamaForCausalLM(t.LlamaConfig(num_key_value_heads=heads, **common))
    elif family == "gemma2":
        model = t.Gemma2ForCausalLM(t.Gemma2Config(num_key_value_heads=heads, head_dim=32, **common))
    elif family == "phi3":
        model = t.Phi3ForCausalLM(t.Phi3Config(num_key_value_heads=heads, pad_token_id=0, **common))
    else:
        raise ValueError(family)
    return model.train()


def configure(name: str, base: torch.nn.Module, ids: torch.Tensor, compile_peak: int | None,
              checkpointing: bool = False):
    """(step, context for its first call, memfit backend or None) of configuration ``name``."""
    model = copy.deepcopy(base)
    ctx = contextlib.nullcontext()
    backend = None
    if name == "hf_checkpointing" or checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if name == "memory_budget":
        ctx = torch._functorch.config.patch(activation_memory_budget=0.5)
    if name.startswith("auto_chunker"):
        ctx = torch._inductor.config.patch({"auto_chunker.enable": True})
    if name == "auto_chunker_loss":
        compiled = torch.compile(lambda x: model(input_ids=x, labels=x).loss)
        step = training_step(compiled, (ids,))
    elif name.startswith("memfit="):
        budget = int(float(name.split("=", 1)[1]) * compile_peak)
        memfit.hf.compile(model, budget=budget)
        backend = model.memfit.backend
        step = training_step(model, (), {"input_ids": ids, "labels": ids})
    else:
        step = training_step(torch.compile(model), (), {"input_ids": ids, "labels": ids})
    return step, ctx, backend


def run(args) -> dict:
    torch._dynamo.config.recompile_limit = 64  # every configuration compiles the same forward code
    torch._dynamo.config.accumulated_recompile_limit = 256
    base = build(args.family, args.layers, args.width, args.vocab, args.tokens, args.dropout)
    ids = torch.randint(0, args.vocab, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    configs = [c for c in PEERS if c in args.configs and not (args.checkpointing and c == "hf_checkpointing")]
    configs += [f"memfit={f:g}" for f in args.fractions if "memfit" in args.configs]
    rows, steps, compile_peak = [], [], None
    for name in configs:
        t0 = time.perf_counter()
        step, ctx, backend = configure(name, base, ids, compile_peak, args.checkpointing)
        row = {"config": name}
        try:
            with ctx:
                m = measure(step, repeat=1)  # the warm-up step compiles, inside the patched config
        except memfit.BudgetError as e:
            row.update(refused=str(e).splitlines()[0])
            print(f"{name}: refused ({row['refused']})", flush=True)
            rows.append(row)
            continue
        row.update(peak=m.peak_bytes, compile_s=time.perf_counter() - t0)
        if name == "compile":
            compile_peak = m.peak_bytes
        if backend is not None:
            row["budget"] = backend.step_budget().budget
            row["notes"] = [str(n) for r in backend.latest_records() for n in r.notes if "region" in n]
        print(f"{name}: peak {format_bytes(m.peak_bytes)} (compiled and measured in {row['compile_s']:.0f} s)", flush=True)
        rows.append(row)
        steps.append((row, step))
    times = paired_times([s for _, s in steps], rounds=args.rounds)
    for (row, _), t in zip(steps, times):
        row["time_s"] = t
    return {"setup": vars(args) | {"fractions": list(args.fractions), "configs": list(args.configs)},
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "rows": rows}


def table(result: dict) -> str:
    s = result["setup"]
    rows = result["rows"]
    base = next((r for r in rows if r["config"] == "compile" and "peak" in r), None)
    gc = f", dropout {s['dropout']:g}" if s.get("dropout") else ""
    gc += ", gradient_checkpointing_enable() in every configuration" if s.get("checkpointing") else ""
    head = (f"HF {s['family']} ({s['layers']} layers x {s['width']}, vocabulary {s['vocab']}, 1 x {s['tokens']} tokens{gc}), "
            f"CPU, torch {result['torch']}, {result['date']}; times paired, medians of {s['rounds']} rounds")
    lines = [head, "", "| configuration | peak | peak / compile | time | time / compile |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['config']} | refused: {r['refused']} | | | |")
            continue
        budget = f" (budget {format_bytes(r['budget'])})" if r.get("budget") else ""
        pr = f"{r['peak'] / base['peak']:.3f}x" if base else ""
        tr = f"{r['time_s'] / base['time_s']:.3f}x" if base else ""
        lines.append(f"| {r['config']}{budget} | {format_bytes(r['peak'])} | {pr} | {1000 * r['time_s']:.1f} ms | {tr} |")
    return "\n".join(lines) + "\n"


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fractions takes numbers separated by commas, got {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"--fractions must be in (0, 1], got {text!r}")
    return values


def _configs(text: str) -> tuple[str, ...]:
    names = tuple(x for x in text.split(",") if x)
    bad = [n for n in names if n not in PEERS + ("memfit",)]
    if bad or "compile" not in names:
        raise argparse.ArgumentTypeError(
            f"--configs: unknown {bad} or 'compile' missing (budgets are fractions of its peak); choose from "
            f"{', '.join(PEERS + ('memfit',))}")
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=FAMILIES, default="qwen2")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--fractions", type=_fractions, default=(0.8, 0.6, 0.4, 0.2))
    p.add_argument("--configs", type=_configs, default=PEERS + ("memfit",))
    p.add_argument("--dropout", type=float, default=0.0, help="dropout probability (default 0: off)")
    p.add_argument("--checkpointing", action="store_true",
                   help="model.gradient_checkpointing_enable() in every configuration")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="hf.md", help="the table (Markdown); the rows as JSON beside it")
    args = p.parse_args(argv)
    if args.rounds < 1 or min(args.layers, args.width, args.vocab, args.tokens) < 1:
        p.error("--rounds, --layers, --width, --vocab and --tokens must be positive")
    if not 0 <= args.dropout < 1:
        p.error(f"--dropout must be in [0, 1), got {args.dropout}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = run(args)
    text = table(result)
    print(text)
    with open(args.out, "w") as f:
        f.write(text)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
