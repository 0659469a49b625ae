"""The budget contract on many drawn models: how often memfit refuses, fits, or warns, and every
violation (a wrong gradient, an overshoot without a warning, a crash), with its spec.

Draws come from ``tests/contract.py`` (conv/BatchNorm stacks, unrolled recurrent cells, top-2 routers,
residual MLP mixes; bf16 or fp32; a user checkpoint region or not; one loss, two, a retain_graph
double backward, or the model called twice; budgets 0.3x-1.2x of memfit's unbudgeted peak).

    python benchmarks/contract.py --draws 60 [--inner eager] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import contract  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--draws", type=int, default=60)
    p.add_argument("--inner", choices=("eager", "inductor"), default="eager")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    outcomes, violations = Counter(), []
    t0 = time.perf_counter()
    for i in range(args.draws):
        spec = contract.Spec(
            family=rng.choice(sorted(contract.FAMILIES)), depth=rng.randint(1, 3), width=rng.choice([16, 32, 48]),
            bf16=rng.random() < 0.5, user_checkpoint=rng.random() < 0.5,
            step=rng.choice(["plain", "two_losses", "retain_graph", "called_twice"]),
            frac=rng.choice([0.3, 0.5, 0.7, 0.85, 1.0, 1.2]),
        )
        outcome, detail = contract.check(spec, inner=args.inner)
        outcomes[outcome] += 1
        if outcome == "violation":
            violations.append((spec, detail))
        print(f"[{i + 1}/{args.draws} {time.perf_counter() - t0:6.0f} s] {outcome:9s} {spec}", file=sys.stderr, flush=True)
    print(f"| inner | draws | refused | fit | warned | skipped | violation |\n|---|---:|---:|---:|---:|---:|---:|\n"
          f"| {args.inner} | {args.draws} | {outcomes['refused']} | {outcomes['fit']} | {outcomes['warned']} | "
          f"{outcomes['skipped']} | {outcomes['violation']} |")
    for spec, detail in violations:
        print(f"- violation: {spec}: {detail}")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
