"""One process of a real ``torch.distributed.pipelining`` run (gloo, CPU), for the tests and the
benchmark. Each rank builds the same GPT-style block stack (same seed), keeps its stages, compiles
them with memfit's split backward, runs one schedule step, and compares its loss and every
gradient with a single-process reference it computes itself. Results go to ``out_dir/rank{r}.json``.

Run by :func:`launch` (``torch.multiprocessing`` spawn, file rendezvous, bounded timeouts).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "examples"))

SCHEDULES = ("1F1B", "GPipe", "ZB1P", "ZBV")  # PyTorch's classes; "memfit:NAME" runs memfit's order of NAME


def build_stages(n_stages: int, width: int = 64, heads: int = 4, blocks_per_stage: int = 1, seed: int = 0):
    """The full model as a list of stages (each an nn.Sequential of GPT blocks; the last ends in a
    LayerNorm and a linear head)."""
    from gpt import Block, GPTConfig

    torch.manual_seed(seed)
    cfg = GPTConfig(n_embd=width, n_head=heads, n_layer=n_stages * blocks_per_stage)
    stages = []
    for s in range(n_stages):
        mods: list[nn.Module] = [Block(cfg) for _ in range(blocks_per_stage)]
        if s == n_stages - 1:
            mods += [nn.LayerNorm(width), nn.Linear(width, width)]
        stages.append(nn.Sequential(*mods))
    return stages


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(out, target)


def reference(stages, x, y, n_micro: int):
    """Loss and gradients of the unsplit model in one process: the mean over microbatches of each
    microbatch's loss (what the schedules compute with ``scale_grads=True``)."""
    for st in stages:
        st.zero_grad(set_to_none=True)
    total = 0.0
    for xm, ym in zip(x.chunk(n_micro), y.chunk(n_micro)):
        h = xm
        for st in stages:
            h = st(h)
        loss = loss_fn(h, ym) / n_micro
        loss.backward()
        total += loss.item()
    grads = {f"{i}.{n}": p.grad.clone() for i, st in enumerate(stages) for n, p in st.named_parameters()}
    return total, grads


def stage_indices(schedule: str, rank: int, world: int) -> list[int]:
    if schedule.startswith("memfit:"):  # memfit's order for a published schedule, run by PyTorch's runtime
        from memfit.pipelining import stage_layout

        return stage_layout(schedule[len("memfit:"):], rank, world)
    if schedule == "ZBV":  # V shape: rank r holds stages r and 2p-1-r
        return [rank, 2 * world - 1 - rank]
    return [rank]


def make_schedule(schedule: str, pstages: list, n_micro: int):
    from torch.distributed.pipelining import (
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleavedZeroBubble,
        ScheduleZBVZeroBubble,
    )

    if schedule.startswith("memfit:"):
        from memfit.pipelining import schedule as memfit_schedule

        return memfit_schedule(pstages, schedule[len("memfit:"):], n_micro, loss_fn=loss_fn)
    cls = {"1F1B": Schedule1F1B, "GPipe": ScheduleGPipe, "ZB1P": ScheduleInterleavedZeroBubble,
           "ZBV": ScheduleZBVZeroBubble}[schedule]
    return cls(pstages if cls in (ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble) else pstages[0],
               n_microbatches=n_micro, loss_fn=loss_fn)


def worker(rank: int, world: int, init_file: str, out_dir: str, schedules: list[str], n_micro: int, inner: str,
           batch: int, seq: int, width: int, steps: int, timing: bool) -> None:
    """Runs each schedule of ``schedules`` (all with the same stage layout) in turn on the same compiled
    stages; per schedule: step times, loss, every gradient's error against the reference."""
    import torch.distributed as dist

    import memfit
    from memfit.pipelining import pipeline_stage

    torch.set_num_threads(1)
    result: dict = {"rank": rank, "ok": False, "runs": {}}
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
        )
        mine = stage_indices(schedules[0], rank, world)
        if any(stage_indices(s, rank, world) != mine for s in schedules):
            raise ValueError(f"schedules {schedules} place stages differently; run them apart")
        n_stages = world * len(mine)
        stages = build_stages(n_stages, width=width)
        torch.manual_seed(1)
        x = torch.randn(batch, seq, width)
        y = torch.randn(batch, seq, width)
        ref_loss, ref_grads = reference(stages, x, y, n_micro)
        for st in stages:
            st.zero_grad(set_to_none=True)
        mb = x[: batch // n_micro]
        if any(s in ("ZB1P", "ZBV") for s in schedules):
            # PyTorch alone refuses a compiled stage module under its zero-bubble schedules
            from torch.distributed.pipelining import PipelineStage, ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble

            plain = [PipelineStage(torch.compile(stages[s]), s, n_stages, torch.device("cpu"),
                                   input_args=(mb.clone().requires_grad_(s > 0),),
                                   output_args=(mb.clone().requires_grad_(s < n_stages - 1),)) for s in mine]
            try:
                (ScheduleInterleavedZeroBubble if "ZB1P" in schedules else ScheduleZBVZeroBubble)(
                    plain, n_microbatches=n_micro, loss_fn=loss_fn)
                result["plain_compile_refused"] = ""
            except RuntimeError as e:
                result["plain_compile_refused"] = str(e)
        pstages = []
        for s in mine:
            pstages.append(
                pipeline_stage(stages[s], s, n_stages, "cpu", input_args=(mb,), output_args=(mb,), inner=inner)
            )
        if timing:
            result["comm_s"] = ping_pong(rank, world, mb)
        op_times: list[tuple[str, int, float]] = []  # (action, stage, seconds) of the current step
        if timing:
            for ps in pstages:
                _time_actions(ps, op_times)
        claimed: list[int] = []  # W tasks each backward left for the schedule (0 would mean W was not deferred)
        for ps in pstages:
            def counted(build=ps.dw_builder):
                run = build()
                claimed.append(len(run.tasks))
                return run

            ps.dw_builder = counted
        for name in schedules:
            run: dict = {}
            result["runs"][name] = run
            first_claim = len(claimed)
            sched = make_schedule(name, pstages, n_micro)
            if hasattr(sched, "pipeline_order"):
                run["pipeline_order"] = {
                    r: [None if a is None else [a.computation_type.value, a.stage_index, a.microbatch_index]
                        for a in acts]
                    for r, acts in sched.pipeline_order.items()
                }
            times = []
            losses: list = []
            for step in range(steps):
                for s in mine:
                    stages[s].zero_grad(set_to_none=True)
                losses = []
                op_times.clear()
                dist.barrier()
                t0 = time.perf_counter()
                if 0 in mine:
                    sched.step(x, target=y, losses=losses)
                else:
                    sched.step(target=y, losses=losses)
                dist.barrier()
                times.append(time.perf_counter() - t0)
                if timing:  # each step's actions, each timed where it ran (for the simulator)
                    run.setdefault("op_times", []).append(list(op_times))
            run["times"] = times
            run["pending_after_step"] = len(memfit.runtime.pending_weight_grads())
            run["claimed_w"] = claimed[first_claim:]
            if losses:
                run["loss"] = float(sum(l.item() for l in losses) / n_micro)
                run["ref_loss"] = ref_loss
            errs = {}
            for s in mine:
                for n, p in stages[s].named_parameters():
                    ref = ref_grads[f"{s}.{n}"]
                    if p.grad is None:
                        errs[f"{s}.{n}"] = None
                    else:
                        errs[f"{s}.{n}"] = float((p.grad - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
            run["grad_rel_err"] = errs
        result["split_graphs"] = sum(
            1 for ps in pstages for r in ps.memfit_backend.records if r.split is not None
        )
        if len(schedules) == 1:  # one schedule: its figures at the top level too
            result.update(result["runs"][schedules[0]])
        result["ok"] = True
    except Exception:
        result["error"] = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def _time_actions(stage, out: list) -> None:
    """Record the seconds each action of ``stage`` takes where the schedule runs it: F, I (input
    gradients), B (full backward: I and W at once), W."""
    fwd, bwd, wgt = stage.forward_one_chunk, stage.backward_one_chunk, stage.backward_weight_one_chunk

    def forward_one_chunk(*a, **k):
        t0 = time.perf_counter()
        r = fwd(*a, **k)
        out.append(("F", stage.stage_index, time.perf_counter() - t0))
        return r

    def backward_one_chunk(*a, **k):
        t0 = time.perf_counter()
        r = bwd(*a, **k)
        out.append(("B" if k.get("full_backward", True) else "I", stage.stage_index, time.perf_counter() - t0))
        return r

    def backward_weight_one_chunk(*a, **k):
        t0 = time.perf_counter()
        r = wgt(*a, **k)
        out.append(("W", stage.stage_index, time.perf_counter() - t0))
        return r

    stage.forward_one_chunk = forward_one_chunk
    stage.backward_one_chunk = backward_one_chunk
    stage.backward_weight_one_chunk = backward_weight_one_chunk


def ping_pong(rank: int, world: int, like: torch.Tensor, reps: int = 20) -> float | None:
    """Seconds one tensor shaped like a microbatch's activation takes from rank 0 to rank 1 (half the
    median round trip, after warm-up): the simulator's ``comm``."""
    import statistics

    import torch.distributed as dist

    buf = torch.empty_like(like)
    rtts = []
    for i in range(reps + 3):
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            dist.send(like.contiguous(), 1)
            dist.recv(buf, 1)
        elif rank == 1:
            dist.recv(buf, 0)
            dist.send(buf, 0)
        if i >= 3:
            rtts.append(time.perf_counter() - t0)
    return statistics.median(rtts) / 2 if rank == 0 else None


def _entry(rank, *args):
    worker(rank, *args)


def launch(world: int, schedule: str | list[str], out_dir: str, *, n_micro: int = 4, inner: str = "eager", batch: int = 8,
           seq: int = 16, width: int = 64, steps: int = 1, timing: bool = False, timeout_s: float = 300) -> list[dict]:
    """Run ``world`` processes; returns each rank's result. Kills them all after ``timeout_s``. ``schedule``:
    one name or a list run in turn on the same stages (PyTorch's "1F1B", "GPipe", "ZB1P", "ZBV", or
    "memfit:NAME" for memfit's order of a published schedule)."""
    schedules = [schedule] if isinstance(schedule, str) else list(schedule)
    import torch.multiprocessing as mp

    init_file = os.path.join(out_dir, "rendezvous")
    if os.path.exists(init_file):
        os.remove(init_file)
    ctx = mp.start_processes(
        _entry,
        args=(world, init_file, out_dir, schedules, n_micro, inner, batch, seq, width, steps, timing),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"pipeline run ({schedule}, {world} processes) did not finish in {timeout_s:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = []
    for r in range(world):
        path = os.path.join(out_dir, f"rank{r}.json")
        with open(path) as f:
            results.append(json.load(f))
    return results
