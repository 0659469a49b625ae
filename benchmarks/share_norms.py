"""Memory-sharing norms on Hugging Face models compiled whole: measured peak and time, with and without.

For each model (a 4-layer HF Llama and a 4-layer BERT masked LM, fp32) and each inner compiler
(``eager``: every saved value is an allocation; ``inductor``), these configurations train the same
initialisation the way users call it (``model(input_ids=ids, labels=ids).loss.backward()``):

* ``none``: ``passes=[]`` (the inner's own partition);
* ``share_norms``: ``passes=["share_norms"]``;
* ``checkpoint``: ``passes=["checkpoint"]`` at a budget of ``--fraction`` x ``none``'s measured peak;
* ``share_norms+checkpoint``: both, at the same budget;
* ``checkpoint floor`` and ``share_norms+checkpoint floor`` (``inner="eager"``): each at the smallest
  peak it can reach (the ``BudgetError`` of a 1-byte budget states it; compiled again at that budget).

Peaks are the allocator's (``memfit.measure``); times are paired (one step of each configuration per
round, medians). Targets (issue 24): under ``inner="eager"`` sharing lowers the peak by at least 10%
against the same plan without it, at no more time.

    python benchmarks/share_norms.py [--models llama,bert] [--inners eager,inductor] [--layers 4]
                                     [--width 256] [--tokens 512] [--fraction 0.8] [--rounds 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys

import torch

import memfit
import memfit.hf
from memfit.measurement import measure, paired_times, training_step
from memfit.units import format_bytes

CONFIGS = ("none", "share_norms", "checkpoint", "share_norms+checkpoint", "checkpoint floor",
           "share_norms+checkpoint floor")


def build(name: str, layers: int, width: int, tokens: int, vocab: int = 2048):
    import transformers as t

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                  num_attention_heads=max(1, width // 64))
    if name == "llama":
        model = t.LlamaForCausalLM(t.LlamaConfig(num_key_value_heads=max(1, width // 128), **common))
    elif name == "bert":
        model = t.BertForMaskedLM(t.BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                               max_position_embeddings=max(512, tokens), **common))
    else:
        raise SystemExit(f"share_norms.py: unknown model {name!r}; choose llama or bert")
    model.train()
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "labels": ids}


def run(args) -> dict:
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 256
    rows = []
    for name in args.models:
        base, kwargs = build(name, args.layers, args.width, args.tokens)
        for inner in args.inners:
            steps, got, budget = [], [], None
            for config in CONFIGS:
                floor = config.endswith(" floor")
                if floor and inner != "eager":
                    continue
                model = copy.deepcopy(base)
                passes = [p for p in ("share_norms", "checkpoint") if p in config.removesuffix(" floor").split("+")]
                options = dict(passes=passes, inner=inner)
                at = budget
                if floor:
                    from memfit.planner import choice

                    choice.REFUSE_BELOW_FLOOR = False  # plan below the step's floor to learn the smallest peak
                    probe = copy.deepcopy(base)
                    memfit.hf.compile(probe, **options, budget=1)
                    try:
                        measure(training_step(probe, (), kwargs), repeat=1)
                    except memfit.BudgetError as e:
                        at = e.smallest_peak
                if "checkpoint" in passes:
                    options.update(budget=at)
                memfit.hf.compile(model, **options)
                step = training_step(model, (), kwargs)
                m = measure(step, repeat=1)  # the warm-up step compiles
                if config == "none":
                    budget = int(args.fraction * m.peak_bytes)
                (record,) = model.memfit.backend.latest_records()
                row = dict(model=name, inner=inner, config=config, peak=m.peak_bytes,
                           sites=len(record.share.sites) if record.share is not None else 0,
                           budget=at if "checkpoint" in passes else None,
                           recomputed=len(record.plan.recomputed) if record.plan is not None else 0,
                           predicted_peak=record.peak_bytes)
                print(f"{name} {inner} {config}: peak {format_bytes(m.peak_bytes)}, {row['sites']} norms shared, "
                      f"{row['recomputed']} values recomputed", file=sys.stderr, flush=True)
                got.append(row)
                steps.append(step)
            for row, t in zip(got, paired_times(steps, rounds=args.rounds)):
                row["time_s"] = t
            rows.extend(got)
    return {"setup": vars(args) | {"models": list(args.models), "inners": list(args.inners)},
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "rows": rows}


def table(result: dict) -> str:
    s = result["setup"]
    lines = [
        f"{s['layers']} layers x {s['width']}, {s['tokens']} tokens, fp32, CPU, torch {result['torch']}, "
        f"{result['date']}; checkpoint budget {s['fraction']:g} x `none`'s measured peak (floor: the smallest reachable); "
        f"times paired, medians of "
        f"{s['rounds']} rounds",
        "",
        "| model | inner | config | norms shared | recomputed | measured peak | vs same without sharing | time | vs same without sharing |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(r["model"], r["inner"], r["config"]): r for r in result["rows"]}
    for r in result["rows"]:
        pair = {"share_norms": "none", "share_norms+checkpoint": "checkpoint",
                "share_norms+checkpoint floor": "checkpoint floor"}.get(r["config"])
        other = by.get((r["model"], r["inner"], pair)) if pair else None
        dp = f"{r['peak'] / other['peak']:.2f}x" if other else ""
        dt = f"{r['time_s'] / other['time_s']:.2f}x" if other else ""
        lines.append(f"| {r['model']} | {r['inner']} | {r['config']} | {r['sites']} | {r['recomputed']} | "
                     f"{format_bytes(r['peak'])} | {dp} | {1e3 * r['time_s']:.1f} ms | {dt} |")
    return "\n".join(lines)


def _list(choices):
    def parse(text: str):
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (got {text!r})")
        return items
    return parse


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=_list(("llama", "bert")), default=("llama", "bert"))
    p.add_argument("--inners", type=_list(("eager", "inductor")), default=("eager", "inductor"))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--fraction", type=float, default=0.8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", help="also write the table (Markdown) and the rows (FILE.json)")
    args = p.parse_args(argv)
    if args.layers < 1 or args.width < 64 or args.tokens < 8 or not 0 < args.fraction <= 1 or args.rounds < 1:
        p.error("need --layers >= 1, --width >= 64, --tokens >= 8, 0 < --fraction <= 1, --rounds >= 1")
    result = run(args)
    text = table(result)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
        with open(args.out + ".json", "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
