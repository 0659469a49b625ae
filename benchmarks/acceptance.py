"""memfit against the tools a user would reach for, side by side: one command, one process per configuration.

For each model (a nanoGPT-style GPT, and HF ``transformers`` GPT-2, Llama and BERT built from small
configs), every configuration below trains the same step in a fresh Python process (so no allocator
state, compile cache in memory or autograd hook leaks from one into the next) and reports the
measured allocator peak of one training step (above what was resident before it, gradients
included) and the median step time:

* ``eager``: no compiler;
* ``compile``: ``torch.compile`` with its defaults (Inductor, min-cut partition);
* ``amb=F``: ``torch.compile`` with ``torch._functorch.config.activation_memory_budget = F``;
* ``checkpoint``: ``torch.utils.checkpoint`` around every transformer layer, under ``torch.compile``;
* ``memfit=X``: ``torch.compile(backend="memfit")`` with an absolute budget of ``X`` times the
  ``compile`` configuration's measured peak (``passes="auto"``: the planner chooses per graph); the HF
  models through ``memfit.hf.compile(model, budget=...)``, as docs/hf.md tells their users (training
  outputs with labels then have ``logits=None``).

The table gives each configuration's peak and time and their ratios to ``eager`` and ``compile``;
for each memfit row, the ratios to per-layer checkpointing and to the ``activation_memory_budget``
fraction whose measured peak is closest. A markdown copy goes to ``--out`` (and JSON beside it).

    python benchmarks/acceptance.py                      # CI size, one thread per process
    python benchmarks/acceptance.py --size full          # bigger models (a GPU, or patience)
    python benchmarks/acceptance.py --models gpt,llama --out results.md

On a machine with CUDA the models run on the GPU (peaks from ``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SIZES = {
    # name: (layers, width, heads, vocab, batch, seq)
    "tiny": (2, 32, 2, 256, 2, 32),  # the test's smoke run
    "ci": (2, 128, 4, 2048, 2, 256),
    "full": (12, 768, 12, 32000, 4, 1024),
}
MODELS = ("gpt", "gpt2", "llama", "bert")
HF_MODELS = ("gpt2", "llama", "bert")
KINDS = ("eager", "compile", "amb", "checkpoint", "memfit")
AMB_FRACTIONS = {"tiny": (0.0,), "ci": (0.5, 0.2, 0.0), "full": (0.8, 0.5, 0.2, 0.0)}
MEMFIT_FRACTIONS = {"tiny": (0.8,), "ci": (0.8, 0.6, 0.45), "full": (0.8, 0.6, 0.45, 0.3)}


# -- models (built inside the worker) ------------------------------------------------------------
def build(name: str, size: str, device: str):
    """(model, args, kwargs, layers): the model returns its loss; ``layers`` are its transformer blocks."""
    import torch

    L, d, h, V, B, T = SIZES[size]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, T), generator=g)
    if name == "gpt":
        sys.path.insert(0, os.path.join(ROOT, "examples"))
        import gpt

        model = gpt.GPT(gpt.GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=h, n_embd=d))
        args, kwargs, layers = (ids, torch.randint(0, V, (B, T), generator=g)), {}, model.h
    elif name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=V, n_positions=T, n_embd=d, n_layer=L, n_head=h, use_cache=False,
                         attn_implementation="sdpa", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(cfg)
        args, kwargs, layers = (), {"input_ids": ids, "labels": ids.clone()}, model.transformer.h
    elif name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=V, hidden_size=d, intermediate_size=int(d * 8 / 3) // 8 * 8, num_hidden_layers=L,
                          num_attention_heads=h, num_key_value_heads=max(1, h // 2), max_position_embeddings=T,
                          use_cache=False, attn_implementation="sdpa")
        model = LlamaForCausalLM(cfg)
        args, kwargs, layers = (), {"input_ids": ids, "labels": ids.clone()}, model.model.layers
    elif name == "bert":
        from transformers import BertConfig, BertForMaskedLM

        cfg = BertConfig(vocab_size=V, hidden_size=d, num_hidden_layers=L, num_attention_heads=h, intermediate_size=4 * d,
                         max_position_embeddings=T, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                         attn_implementation="sdpa")
        model = BertForMaskedLM(cfg)
        labels = torch.where(torch.rand(B, T, generator=g) < 0.15, ids, torch.full_like(ids, -100))  # 15% masked
        args, kwargs, layers = (), {"input_ids": ids, "labels": labels}, model.bert.encoder.layer
    else:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    model.to(device)
    args = tuple(a.to(device) for a in args)
    kwargs = {k: v.to(device) for k, v in kwargs.items()}
    return model, args, kwargs, layers


def _checkpoint_every_layer(layers) -> None:
    """Wrap every layer's forward in ``torch.utils.checkpoint`` (non-reentrant), as a user would."""
    import functools

    from torch.utils.checkpoint import checkpoint

    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def worker(spec: dict) -> dict:
    """Run one configuration; returns its measurement (or the reason it could not run)."""
    import torch

    import memfit
    from memfit import BudgetError
    from memfit.measurement import measure, training_step

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    model, args, kwargs, layers = build(spec["model"], spec["size"], device)
    cfg = spec["config"]
    out = {"model": spec["model"], "config": cfg, "device": device}
    be = None
    if cfg == "eager":
        run = model
    elif cfg == "compile":
        run = torch.compile(model)
    elif cfg.startswith("amb="):
        torch._functorch.config.activation_memory_budget = float(cfg[4:])
        run = torch.compile(model)
    elif cfg == "checkpoint":
        _checkpoint_every_layer(layers)
        run = torch.compile(model)
    elif cfg.startswith("memfit="):
        out["budget"] = spec["budget"]
        if spec["model"] in HF_MODELS:
            import memfit.hf

            run = memfit.hf.compile(model, budget=spec["budget"])
            be = run.memfit.backend
        else:
            be = memfit.backend(budget=spec["budget"])
            run = torch.compile(model, backend=be)
    else:
        raise SystemExit(f"unknown configuration {cfg!r}")
    step = training_step(run, args, kwargs)
    t0 = time.perf_counter()
    try:
        step.before()
        step()  # the first step compiles
    except BudgetError as e:
        out.update(infeasible=True, smallest_peak=e.smallest_peak, error=str(e).splitlines()[0])
        return out
    out["first_step_s"] = time.perf_counter() - t0
    m = measure(step, device=device, warmup=1, repeat=spec["repeat"])
    out.update(peak=m.peak_bytes, time_s=m.time_s, times=list(m.times_s))
    if be is not None:
        out["predicted_peak"] = be.step_analysis().memory.peak_bytes  # replayed from Inductor's buffer plans
        out["planned_peak"] = be.step_analysis(replayed=False).memory.peak_bytes  # the planner's FX-level model
        out["chosen"] = sorted({next((c["label"] for c in r.candidates if c["chosen"]), r.partition) for r in be.records})
        out["graphs"] = len(be.records)
    return out


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# -- driver --------------------------------------------------------------------------------------
def run_config(spec: dict, timeout: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    # Inductor's compile workers are processes of their own: one in-process thread keeps a configuration
    # that is compiling on its core while the other one is timed (parallel memfit steps measured 2x slower)
    env = dict(os.environ, PYTHONWARNINGS="ignore", TORCHINDUCTOR_COMPILE_THREADS="1")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {**spec, "error": f"exit {p.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1][len("RESULT "):])


def fmt_mib(n) -> str:
    return "" if n is None else f"{n / 2**20:.2f}"


def tables(results: dict[str, list[dict]]) -> str:
    """Markdown: one table per model, then memfit against the two checkpointing baselines."""
    lines = []
    for name, rows in results.items():
        ok = {r["config"]: r for r in rows if "peak" in r}
        eager, comp = ok.get("eager"), ok.get("compile")
        lines += [f"### {name}", "",
                  "| configuration | peak MiB | step ms | peak / eager | peak / compile | time / compile | notes |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            if "peak" not in r:
                why = r.get("error") or ""
                if r.get("infeasible"):
                    why = f"no plan fits: smallest reachable {fmt_mib(r['smallest_peak'])} MiB"
                budget = f" ({fmt_mib(r['budget'])} MiB)" if r.get("budget") else ""
                lines.append(f"| {r['config']}{budget} | | | | | | {why} |")
                continue
            note = ""
            if "budget" in r:
                note = (f"budget {fmt_mib(r['budget'])} MiB, predicted {fmt_mib(r['predicted_peak'])} MiB, "
                        f"{'/'.join(r['chosen'])}")
            ratio = lambda a, b: f"{a / b:.3f}" if b else ""  # noqa: E731
            lines.append(
                f"| {r['config']} | {fmt_mib(r['peak'])} | {r['time_s'] * 1e3:.1f} | "
                f"{ratio(r['peak'], eager and eager['peak'])} | {ratio(r['peak'], comp and comp['peak'])} | "
                f"{ratio(r['time_s'], comp and comp['time_s'])} | {note} |")
        ambs = [r for c, r in ok.items() if c.startswith("amb=")]
        ck = ok.get("checkpoint")
        mem = [r for c, r in ok.items() if c.startswith("memfit=")]
        if mem:
            lines += ["", "| memfit | peak / checkpoint | time / checkpoint | closest amb | peak / it | time / it |",
                      "|---|---:|---:|---|---:|---:|"]
            for r in mem:
                cells = [r["config"]]
                cells += [f"{r['peak'] / ck['peak']:.3f}", f"{r['time_s'] / ck['time_s']:.3f}"] if ck else ["", ""]
                a = min(ambs, key=lambda x: abs(x["peak"] - r["peak"])) if ambs else None
                cells += [a["config"], f"{r['peak'] / a['peak']:.3f}", f"{r['time_s'] / a['time_s']:.3f}"] if a else ["", "", ""]
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--size", choices=tuple(SIZES), default="ci")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--configs", default=",".join(KINDS), help=f"comma-separated kinds, from {', '.join(KINDS)}")
    p.add_argument("--repeat", type=int, default=3, help="timed steps per configuration (median)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per configuration")
    p.add_argument("--threads", type=int, default=1 if not _has_cuda() else 0,
                   help="CPU threads per configuration (0: torch's default). Default 1 on CPU: with two OpenMP "
                        "threads and another job on one of 2 cores, the same step took 28 ms in one process and "
                        "1055 ms in the next")
    p.add_argument("--jobs", type=int, default=2 if not _has_cuda() else 1,
                   help="configurations run at once, each in its own process (default 2 on CPU: one per core of a "
                        "2-core machine, one thread each; 1 on a GPU)")
    p.add_argument("--out", help="write the markdown tables here (and the raw results as .json beside it)")
    a = p.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(worker(json.loads(a.worker))), flush=True)
        return 0
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        p.error(f"--models {a.models!r}: unknown {bad or 'empty'}; choose from {', '.join(MODELS)}")
    kinds = [k.strip() for k in a.configs.split(",") if k.strip()]
    if not kinds or any(k not in KINDS for k in kinds):
        p.error(f"--configs {a.configs!r}: choose from {', '.join(KINDS)}")
    if "memfit" in kinds and "compile" not in kinds:
        p.error("--configs: memfit's budgets are fractions of the compile configuration's peak; add compile")
    L, d, h, V, B, T = SIZES[a.size]
    import torch

    print(f"torch {torch.__version__}; size {a.size}: {L} layers x {d} wide, {h} heads, vocab {V}, "
          f"batch {B} x {T} tokens; one process per configuration, {a.threads or 'default'} thread(s) each, {a.jobs} at once", flush=True)
    t_start = time.perf_counter()
    configs = [c for c in ["eager", "compile"] + [f"amb={f}" for f in AMB_FRACTIONS[a.size]] + ["checkpoint"]
               if c.split("=")[0] in kinds]
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    order = {c: i for i, c in enumerate(configs + [f"memfit={f}" for f in MEMFIT_FRACTIONS[a.size]])}
    results: dict[str, list[dict]] = {name: [] for name in models}
    failed = 0
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        def submit(spec):
            return pool.submit(lambda: (spec, time.perf_counter(), run_config(spec, a.timeout), time.perf_counter()))

        pending = {submit({"model": name, "size": a.size, "config": c, "repeat": a.repeat, "threads": a.threads})
                   for name in models for c in configs}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                spec, t0, r, t1 = fut.result()
                results[spec["model"]].append(r)
                what = (f"peak {fmt_mib(r['peak'])} MiB, {r['time_s'] * 1e3:.1f} ms/step" if "peak" in r else
                        f"no plan fits (smallest {fmt_mib(r['smallest_peak'])} MiB)" if r.get("infeasible") else
                        f"FAILED: {r.get('error')}")
                failed += "error" in r and not r.get("infeasible")
                print(f"[{t1 - t_start:6.0f} s] {spec['model']:6s} {spec['config']:12s} {what}  ({t1 - t0:.0f} s)", flush=True)
                if spec["config"] == "compile" and "peak" in r and "memfit" in kinds:  # budgets: fractions of this peak
                    pending |= {submit({**spec, "config": f"memfit={f}", "budget": int(r["peak"] * f)})
                                for f in MEMFIT_FRACTIONS[a.size]}
    for rows in results.values():
        rows.sort(key=lambda r: order.get(r["config"], len(order)))
    text = tables(results)
    print("\n" + text)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if a.out:
        with open(a.out, "w") as f:
            f.write(f"`python benchmarks/acceptance.py --size {a.size} --models {','.join(models)} --threads {a.threads} --jobs {a.jobs}` "
                    f"(torch {torch.__version__}, {'cuda' if torch.cuda.is_available() else 'cpu'})\n\n{text}")
        with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
            json.dump(results, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
