"""Does ``passes="auto"`` pick well? Every stream x checkpoint combination measured, at several budgets.

For each model (a nanoGPT-style GPT at the acceptance benchmark's CI size, and an HF Llama from a small
config compiled whole with ``memfit.hf.compile``; Inductor, one thread) and each budget (fractions of
the unplanned memfit step's measured peak, from below the smallest feasible to the unplanned peak), it
compiles and measures:

* ``auto``: ``passes="auto"`` (the planner's one search over streaming and checkpointing, by time);
* ``checkpoint``: checkpointing alone;
* ``stream <subset> x<chunks> [+attn]``: the stream pass forced to stream the ``subset`` largest regions
  (1, 2, or every one) in a fixed chunk count (``--chunks``), with attentions by query chunks or not,
  then checkpointing as needed (``passes=["stream", "checkpoint"]``).

A configuration fits where its measured peak is within the budget (+2%, the allocator's rounding). The
fitting configurations' steps are then timed paired (``--rounds`` alternating steps each, medians), and
the table gives auto's time against the fastest fitting one: the target is auto within 5% of the best at
every budget. A second table checks the stream time model: each streamed configuration's predicted
step time over the unplanned step's predicted time, against the same ratio measured (target: within
15%, ``memfit.planner.cost.CPU_STREAM_FACTOR``).

    python benchmarks/auto_sweep.py [--models gpt,llama] [--fractions 0.3,0.4,0.5,0.7,1.0]
                                    [--chunks 2,4,8,16] [--rounds 7] [--out r.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

import gpt  # noqa: E402
import hf_llama  # noqa: E402

import memfit  # noqa: E402
import memfit.hf  # noqa: E402
from memfit import BudgetError  # noqa: E402
from memfit.compiler import search  # noqa: E402
from memfit.measurement import measure, paired_times, training_step  # noqa: E402
from memfit.units import format_bytes  # noqa: E402

MODELS = {
    "gpt": ("nanoGPT-style GPT, 2 layers, 128 wide, vocab 2048, batch 2 x 256",
            lambda: gpt.factory(batch=2, seq=256, n_layer=2, n_embd=128, n_head=4, vocab_size=2048, block_size=256),
            False),
    "llama": ("HF Llama, 2 layers, 128 wide, GQA 4/2, vocab 2048, batch 2 x 256, memfit.hf.compile",
              lambda: hf_llama.factory(batch=2, seq=256, vocab_size=2048, hidden_size=128, intermediate_size=344,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
              True),
}

#: The stream configuration the patched ``search.stream`` carries out (None: the pass's own search).
FORCED: dict | None = None
_stream = search.stream


def _forced_stream(backend, gm, example_inputs, notes=(), *, warn=True):
    """``search.stream`` with the regions fixed (the ``largest`` regions; the chunk count is the option)."""
    if FORCED is None:
        return _stream(backend, gm, example_inputs, notes, warn=warn)
    got = search.stream_once(backend, gm, example_inputs, list(notes), 1, FORCED["largest"], warn=warn)
    return got.graph, list(got.notes)


search.stream = _forced_stream


def _split(inputs):
    return ((), inputs) if isinstance(inputs, dict) else (tuple(inputs), {})


def configs(chunks: list[int]) -> dict:
    out = {"auto": (dict(passes="auto"), None), "checkpoint": (dict(passes=["checkpoint"]), None)}
    for largest in (1, 2, None):
        for k in chunks:
            name = f"stream {largest or 'all'} x{k}"
            out[name] = (dict(passes=["stream", "checkpoint"], stream_chunks=k, stream_attention=False),
                         {"largest": largest})
    for k in chunks:
        out[f"stream all x{k} +attn"] = (dict(passes=["stream", "checkpoint"], stream_chunks=k, stream_attention=True),
                                        {"largest": None})
    return out


def run_model(key: str, fractions: list[float], chunks: list[int], rounds: int) -> list[dict]:
    global FORCED
    desc, factory, hf = MODELS[key]
    model, inputs = factory()
    args, kwargs = _split(inputs)
    print(f"\n== {key}: {desc}", flush=True)

    def build(budget, opts, forced):
        global FORCED
        FORCED = forced
        m = copy.deepcopy(model)
        try:
            if hf:
                compiled = memfit.hf.compile(m, budget=budget, inner="inductor", **opts)
                be = compiled.memfit.backend
            else:
                be = memfit.backend(budget=budget, inner="inductor", **opts)
                compiled = torch.compile(m, backend=be)
            step = training_step(compiled, args, kwargs)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = measure(step, repeat=1)
        finally:
            FORCED = None
        return step, got, be

    torch._dynamo.reset()
    _, base, be = build(None, dict(passes=["checkpoint"]), None)
    base_pred = sum(r.analysis.time_s for r in be.records)
    print(f"unplanned memfit step: {base} (predicted {1e3 * base_pred:.2f} ms)", flush=True)
    rows = []
    for frac in fractions:
        budget = int(base.peak_bytes * frac)
        torch._dynamo.reset()
        steps, row = {}, {"budget": budget, "fraction": frac, "configs": {}}
        for name, (opts, forced) in configs(chunks).items():
            if name != "auto" and name != "checkpoint" and frac >= 1.0:
                continue  # the unplanned step fits: nothing to stream
            try:
                step, m, be = build(budget, opts, forced)
            except BudgetError as e:
                row["configs"][name] = {"error": str(e).splitlines()[0][:160]}
                continue
            except Exception as e:  # noqa: BLE001 - a forced configuration the pass cannot carry out
                row["configs"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
                continue
            if not be.records:  # Dynamo ran the step without memfit (a backend failure it suppressed)
                row["configs"][name] = {"error": "no graph compiled by memfit"}
                continue
            rec = be.records[-1]
            fits = m.peak_bytes <= 1.02 * budget
            verdict = next((str(n) for n in rec.notes if "stream plan(s)" in str(n)), "")
            row["configs"][name] = {
                "peak": m.peak_bytes, "fits": fits, "predicted_s": sum(r.analysis.time_s for r in be.records),
                "chose": next((c["label"] for c in rec.candidates if c.get("chosen")), rec.partition),
                "verdict": verdict,
            }
            if fits:
                steps[name] = step
        names = list(steps)
        if names:
            for name, t in zip(names, paired_times([steps[n] for n in names], rounds=rounds)):
                row["configs"][name]["paired_s"] = t
        timed = {n: c for n, c in row["configs"].items() if "paired_s" in c}
        best = min((n for n in timed if n != "auto"), key=lambda n: timed[n]["paired_s"], default=None)
        a = row["configs"].get("auto", {})
        row["best"] = best
        bud = f"{format_bytes(budget)} ({frac:.2f})"
        if "paired_s" not in a:
            why = a.get("error") or (f"measured {format_bytes(a['peak'])}, over" if "peak" in a else "not run")
            print(f"{bud:>22} | auto: {why} | best fitting: {best or 'none'}", flush=True)
        else:
            ratio = a["paired_s"] / timed[best]["paired_s"] if best else float("nan")
            row["auto_over_best"] = ratio
            if a.get("verdict"):
                print(f"{'':>22}   ({a['verdict'][:200]})")
            print(f"{bud:>22} | auto {a['chose'][:40]:<40} {format_bytes(a['peak']):>10} {1e3 * a['paired_s']:7.1f} ms | "
                  f"best {best or '-':<18} {1e3 * timed[best]['paired_s'] if best else float('nan'):7.1f} ms | "
                  f"auto/best {ratio:.3f} | {len(timed) - 1} fitting of {len(row['configs']) - 1}", flush=True)
        # the stream time model: predicted over unplanned, against measured over unplanned (paired where timed)
        plain_t = timed.get("checkpoint", {}).get("paired_s") if frac >= 1.0 else None
        row["time_model"] = []
        for n, c in timed.items():
            if n.startswith("stream"):
                row["time_model"].append({"config": n, "predicted": c["predicted_s"] / base_pred,
                                          "measured_s": c["paired_s"]})
        rows.append(row)
    # the time-model table: measured ratios against the unplanned step, paired in a run of their own
    print(f"\n-- {key}: stream time model (predicted and measured step time over the unplanned step's)", flush=True)
    torch._dynamo.reset()
    plain_step, _, _ = build(None, dict(passes=["checkpoint"]), None)
    model_rows = []
    for k in chunks:
        for attention in (False, True):
            name = f"stream all x{k}" + (" +attn" if attention else "")
            step, _, be = build(None, dict(passes=["stream"], stream_chunks=k, stream_attention=attention),
                                {"largest": None})
            t_plain, t = paired_times([plain_step, step], rounds=rounds)
            pred = sum(r.analysis.time_s for r in be.records) / base_pred
            meas = t / t_plain
            model_rows.append({"config": name, "predicted": pred, "measured": meas, "error": pred / meas - 1})
            print(f"  {name:<22} predicted {pred:5.2f}x  measured {meas:5.2f}x  error {100 * (pred / meas - 1):+5.1f}%",
                  flush=True)
    return {"rows": rows, "time_model": model_rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="gpt,llama")
    p.add_argument("--fractions", default="0.3,0.4,0.5,0.7,1.0",
                   help="budgets as fractions of the unplanned step's measured peak")
    p.add_argument("--chunks", default="2,4,8,16")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out")
    a = p.parse_args()
    torch.set_num_threads(1)
    fractions = [float(x) for x in a.fractions.split(",")]
    chunks = [int(x) for x in a.chunks.split(",")]
    out = {}
    for key in a.models.split(","):
        if key not in MODELS:
            sys.exit(f"unknown model {key!r}: choose from {', '.join(MODELS)}")
        out[key] = run_model(key, fractions, chunks, a.rounds)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1, default=str)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
