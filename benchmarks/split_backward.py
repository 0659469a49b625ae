"""Zero-bubble split backward: held memory between B and W, and a real pipeline against the simulator.

1. Held memory. One GPT transformer block (a pipeline stage's worth), a microbatch in, a gradient
   out. PyTorch's runtime split (``stage_backward_input`` then ``stage_backward_weight``, what its
   zero-bubble schedules run) against memfit's compiled split (B, then the queued W): the bytes the
   allocator still holds after B, less the input gradient both return. Measured in one process,
   side by side, plus the planner's own count.
2. Pipeline. The real ``torch.distributed.pipelining`` (gloo, 2 CPU processes, one thread each),
   memfit-compiled stages under PyTorch's ``Schedule1F1B``, ``ScheduleInterleavedZeroBubble`` and
   ``ScheduleZBVZeroBubble`` and under memfit's orders of 1F1B, ZB-H1, ZB-H2, ZB-V, V-Half, V-Min
   (``memfit.pipelining.schedule``): measured step times beside the simulator's, fed with what the
   same run measured (each action's median time per stage, timed where the schedule ran it, and the
   hop time of one activation by ping-pong), as the zero-bubble paper profiled its own runs.

    python benchmarks/split_backward.py [--width 256] [--seq 256] [--micro 8] [--skip memory|pipeline]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, ROOT)

import memfit  # noqa: E402
from memfit.config import format_bytes  # noqa: E402
from memfit.measurement import retained_bytes  # noqa: E402

MiB = 2**20


def held_memory(width: int, seq: int, batch: int, checkpoint: bool) -> list[tuple[str, int, int | None]]:
    """(method, measured bytes held between B and W, planner's count) rows."""
    from gpt import Block, GPTConfig
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    torch.manual_seed(0)
    block = Block(GPTConfig(n_embd=width, n_head=max(1, width // 64)))
    if checkpoint:
        inner_block = block

        class Checkpointed(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.block = inner_block

            def forward(self, x):
                return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)

        block = Checkpointed()
    x0 = torch.randn(batch, seq, width)
    dout = torch.randn(batch, seq, width)
    rows = []

    held: dict = {}
    x = x0.clone().requires_grad_()

    def pytorch_b():
        out = block(x)
        held["dx"], held["groups"] = stage_backward_input([out], [dout], [x], block.parameters())
        del out  # the stage drops its output after I (it was sent on)

    nbytes = retained_bytes(pytorch_b)
    dx_bytes = sum(t.numel() * t.element_size() for t in held["dx"] if t is not None)
    rows.append(("pytorch stage_backward_input", nbytes - dx_bytes, None))
    stage_backward_weight(block.parameters(), held.pop("groups"))
    ref = [p.grad.clone() for p in block.parameters()]
    block.zero_grad(set_to_none=True)

    for inner in ("eager", "inductor"):
        torch._dynamo.reset()
        backend = memfit.backend(passes=["split_backward"], inner=inner)
        compiled = torch.compile(block, backend=backend)
        x = x0.clone().requires_grad_()
        compiled(x).backward(dout)  # compile
        block.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()

        def memfit_b():
            with memfit.defer_weight_grads():  # B alone: W queued, its inputs held
                compiled(x).backward(dout)

        nbytes = retained_bytes(memfit_b)
        plan = backend.records[-1].split
        memfit.run_weight_grads()
        err = max(float((p.grad - r).abs().max() / r.abs().max()) for p, r in zip(block.parameters(), ref))
        assert err < 1e-4, f"memfit's split gradients differ from PyTorch's by {err}"
        block.zero_grad(set_to_none=True)
        rows.append((f"memfit split_backward ({inner})", nbytes - x.grad.numel() * 4, plan.held_bytes))
    torch._dynamo.reset()
    return rows


ONE_STAGE = ["1F1B", "ZB1P", "memfit:1F1B", "memfit:ZB-H1", "memfit:ZB-H2"]
V_STAGES = ["ZBV", "memfit:ZB-V", "memfit:V-Half", "memfit:V-Min"]


def pipeline(names: list[str], width: int, seq: int, micro: int, mb: int, steps: int) -> list[dict]:
    """One launch of 2 gloo processes running ``names`` in turn on the same compiled stages, each action
    timed where it ran, plus a ping-pong of one activation (the hop time)."""
    from tests.pipeline_worker import launch

    with tempfile.TemporaryDirectory() as d:
        res = launch(2, names, d, n_micro=micro, batch=micro * mb, seq=seq, width=width, steps=steps,
                     timing=True, timeout_s=900)
    for r in res:
        if not r["ok"]:
            raise RuntimeError(r["error"])
        for name in names:
            assert max(r["runs"][name]["grad_rel_err"].values()) < 1e-5, name
    return res


def simulated(name: str, res: list[dict], micro: int, step: int):
    """The simulator's time for step ``step`` of run ``name``, fed only with what that step measured:
    each action's median time per stage, and the hop time."""
    from types import SimpleNamespace

    from memfit.planner.schedule import StageCosts, orders_for, orders_from_pytorch, simulate_orders

    times: dict[tuple[str, int], list[float]] = {}
    for r in res:
        for kind, stage, sec in r["runs"][name]["op_times"][step]:
            times.setdefault((kind, stage), []).append(sec)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_virtual = 1 + max(s for _, s in med)
    vcosts = []
    for s in range(n_virtual):
        if ("B", s) in med:  # full backward (1F1B): I and W in one action
            vcosts.append(StageCosts(med[("F", s)], med[("B", s)], 0.0))
        else:
            vcosts.append(StageCosts(med[("F", s)], med[("I", s)], med[("W", s)]))
    run0 = res[0]["runs"][name]
    if name.startswith("memfit:") or name == "1F1B":
        orders = orders_for(name.removeprefix("memfit:"), len(res), micro)[0]
    else:
        acts = {int(r): [None if a is None else SimpleNamespace(computation_type=a[0], stage_index=a[1],
                                                                 microbatch_index=a[2]) for a in lst]
                for r, lst in run0["pipeline_order"].items()}
        orders = orders_from_pytorch(acts)
    ranks = [StageCosts(0, 0, 0)] * len(res)
    return simulate_orders(name, orders, ranks, micro, comm=res[0]["comm_s"], virtual_costs=vcosts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4, help="microbatch size (part 1 and 2)")
    ap.add_argument("--micro", type=int, default=8, help="microbatches per pipeline step")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--skip", choices=("memory", "pipeline"), default=None)
    ap.add_argument("--dump", metavar="PATH", default=None, help="also write the pipeline runs' raw results (JSON)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}; GPT block {args.width} wide, microbatch {args.batch} x {args.seq} tokens")

    if args.skip != "memory":
        print("\n1. bytes held between B and W (allocator, after B; the input gradient both return is left out)")
        for ckpt in (False, True):
            rows = held_memory(args.width, args.seq, args.batch, ckpt)
            base = rows[0][1]
            print(f"  {'with' if ckpt else 'without'} activation checkpointing of the block:")
            for name, nbytes, planned in rows:
                extra = f"  planner {format_bytes(planned)}" if planned is not None else ""
                print(f"    {name:36s} {format_bytes(nbytes):>11s}  ({100 * nbytes / base:5.1f}% of PyTorch's){extra}")
    if args.skip == "pipeline":
        return
    print("\n2. real pipeline: 2 processes (gloo, 1 thread each), 1 GPT block per stage, memfit-compiled stages;")
    print("   simulated from the same run's measured action times (median per stage) and hop time")
    print(f"   (medians over steps 2-{args.steps}; meas/sim: the median of each step's own ratio)")
    print(f"  {'schedule':18s} {'measured':>10s} {'simulated':>10s} {'meas/sim':>9s} {'sim bubble':>10s}")
    dumped = {}
    for names in (ONE_STAGE, V_STAGES):
        res = pipeline(names, args.width, args.seq, args.micro, args.batch, args.steps)
        dumped[",".join(names)] = res
        for name in names:
            # each step against its own simulation (the machine's speed drifts between steps); the first compiles
            steps = range(1, len(res[0]["runs"][name]["times"]))
            meas = [res[0]["runs"][name]["times"][i] for i in steps]
            sims = [simulated(name, res, args.micro, i) for i in steps]
            ratio = statistics.median(m / s.step_time for m, s in zip(meas, sims))
            print(f"  {name:18s} {statistics.median(meas) * 1e3:8.1f}ms "
                  f"{statistics.median(s.step_time for s in sims) * 1e3:8.1f}ms {ratio:9.3f} "
                  f"{100 * statistics.median(s.bubble_rate_synced for s in sims):9.1f}%")
        print(f"  (hop time {res[0]['comm_s'] * 1e3:.2f} ms)")
    if args.dump:
        import json

        with open(args.dump, "w") as f:
            json.dump(dumped, f)


if __name__ == "__main__":
    main()
