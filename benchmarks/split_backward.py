"""Zero-bubble split backward: held memory between B and W, and a real pipeline against the simulator.

1. Held memory. One GPT transformer block (a pipeline stage's worth), a microbatch in, a gradient
   out. PyTorch's runtime split (``stage_backward_input`` then ``stage_backward_weight``, what its
   zero-bubble schedules run) against memfit's compiled split (B, then the queued W): the bytes the
   allocator still holds after B, less the input gradient both return. Measured in one process,
   side by side, plus the planner's own count.
2. Pipeline. The real ``torch.distributed.pipelining`` (gloo, 2 CPU processes, one thread each),
   memfit-compiled stages under ``Schedule1F1B`` and ``ScheduleInterleavedZeroBubble`` (ZB-H1):
   measured step times, beside the simulator's prediction from F, B and W times measured on one
   stage in this process.

    python benchmarks/split_backward.py [--width 256] [--seq 256] [--micro 8]
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


def stage_times(width: int, seq: int, mb: int, repeat: int = 5) -> tuple[float, float, float]:
    """Median F, B, W seconds of one stage (one GPT block) on one microbatch, one thread."""
    from gpt import Block, GPTConfig

    torch.manual_seed(0)
    block = Block(GPTConfig(n_embd=width, n_head=max(1, width // 64)))
    compiled = torch.compile(block, backend=memfit.backend(passes=["split_backward"], inner="eager"))
    x = torch.randn(mb, seq, width, requires_grad=True)
    dout = torch.randn(mb, seq, width)
    f, b, w = [], [], []
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        out = compiled(x)
        t1 = time.perf_counter()
        with memfit.defer_weight_grads():  # B now, W below
            out.backward(dout)
        t2 = time.perf_counter()
        memfit.run_weight_grads()
        t3 = time.perf_counter()
        if i:
            f.append(t1 - t0)
            b.append(t2 - t1)
            w.append(t3 - t2)
        x.grad = None
        block.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    return statistics.median(f), statistics.median(b), statistics.median(w)


def pipeline(width: int, seq: int, micro: int, mb: int, steps: int) -> tuple[dict[str, float], dict]:
    from tests.pipeline_worker import launch

    out, orders = {}, {}
    for schedule in ("1F1B", "ZB1P"):
        with tempfile.TemporaryDirectory() as d:
            res = launch(2, schedule, d, n_micro=micro, batch=micro * mb, seq=seq, width=width, steps=steps,
                         timeout_s=600)
        for r in res:
            if not r["ok"]:
                raise RuntimeError(r["error"])
            assert max(r["grad_rel_err"].values()) < 1e-5
        out[schedule] = statistics.median(res[0]["times"][1:])  # the first step compiles
        if "pipeline_order" in res[0]:
            orders[schedule] = res[0]["pipeline_order"]
    return out, orders


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4, help="microbatch size (part 1 and 2)")
    ap.add_argument("--micro", type=int, default=8, help="microbatches per pipeline step")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    print(f"torch {torch.__version__}; GPT block {args.width} wide, microbatch {args.batch} x {args.seq} tokens")

    print("\n1. bytes held between B and W (allocator, after B; the input gradient both return is left out)")
    for ckpt in (False, True):
        rows = held_memory(args.width, args.seq, args.batch, ckpt)
        base = rows[0][1]
        print(f"  {'with' if ckpt else 'without'} activation checkpointing of the block:")
        for name, nbytes, planned in rows:
            extra = f"  planner {format_bytes(planned)}" if planned is not None else ""
            print(f"    {name:36s} {format_bytes(nbytes):>11s}  ({100 * nbytes / base:5.1f}% of PyTorch's){extra}")

    print("\n2. real pipeline: 2 processes (gloo, 1 thread each), 1 GPT block per stage, memfit-compiled stages")
    torch.set_num_threads(1)
    f, b, w = stage_times(args.width, args.seq, args.batch)
    from memfit.planner.schedule import StageCosts, simulate

    costs = [StageCosts(f, b, w)] * 2
    pred = {"1F1B": simulate("1F1B", costs, args.micro), "ZB1P": simulate("ZB-H1", costs, args.micro)}
    print(f"  one stage, one microbatch: F {f * 1e3:.1f} ms, B {b * 1e3:.1f} ms, W {w * 1e3:.1f} ms")
    measured, orders = pipeline(args.width, args.seq, args.micro, args.batch, args.steps)
    if "ZB1P" in orders:  # simulate the very order PyTorch's ZB1P ran, as well as our ZB-H1
        from types import SimpleNamespace

        from memfit.planner.schedule import orders_from_pytorch, simulate_orders

        acts = {int(r): [None if a is None else SimpleNamespace(computation_type=a[0], stage_index=a[1],
                                                                 microbatch_index=a[2]) for a in lst]
                for r, lst in orders["ZB1P"].items()}
        pred["ZB1P (PyTorch's order)"] = simulate_orders("ZB1P", orders_from_pytorch(acts), costs, args.micro)
        measured["ZB1P (PyTorch's order)"] = measured["ZB1P"]
    print(f"  {'schedule':24s} {'measured':>10s} {'simulated':>10s} {'meas/sim':>9s} {'sim bubble':>10s}")
    for k in pred:
        sim = pred[k]
        print(f"  {k:24s} {measured[k] * 1e3:8.1f}ms {sim.step_time * 1e3:8.1f}ms {measured[k] / sim.step_time:9.3f} "
              f"{100 * sim.bubble_rate:9.1f}%")
    print(f"  ZB1P / 1F1B step time: measured {measured['ZB1P'] / measured['1F1B']:.3f}, simulated "
          f"{pred['ZB1P'].step_time / pred['1F1B'].step_time:.3f}")


if __name__ == "__main__":
    main()
