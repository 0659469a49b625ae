"""Run memfit-compiled modules as stages of ``torch.distributed.pipelining`` schedules.

PyTorch's zero-bubble schedules (``ScheduleInterleavedZeroBubble``, ``ScheduleZBVZeroBubble``,
``ScheduleDualPipeV``) split each stage's backward at run time by walking the autograd graph, which
a compiled module hides inside one node, so they refuse any stage holding an ``OptimizedModule``
(``_check_torch_compile_compatibility``; pytorch#161904, PRs #143599 and #162511). memfit splits the
compiled backward itself (the ``split_backward`` pass): the stage's backward runs B and queues W,
and the stage's ``dw_builder`` hook hands the queued W to the schedule, which runs it when its
``W`` action comes. The module is compiled in place (``nn.Module.compile``), so no
``OptimizedModule`` appears among the stage's modules::

    stage = memfit.pipelining.pipeline_stage(block, stage_index=rank, num_stages=world, device="cpu",
                                             input_args=example_microbatch)
    schedule = ScheduleInterleavedZeroBubble([stage], n_microbatches=8, loss_fn=loss_fn)

The published schedules PyTorch has no class for (ZB-H1 and ZB-H2 in the zero-bubble paper's order,
the controllable-memory paper's V-Half and V-Min) run through :func:`schedule`, which hands PyTorch's
runtime the per-rank order memfit's simulator uses (``memfit.planner.schedule.orders_for``), so what
runs is what was simulated::

    stages = [pipeline_stage(chunk, s, 2 * world, "cpu", input_args=mb) for s in (rank, 2 * world - 1 - rank)]
    sched = memfit.pipelining.schedule(stages, "V-Half", n_microbatches=8, loss_fn=loss_fn)
"""

from __future__ import annotations

from typing import Any

import torch

from memfit.runtime import claim_weight_grads


def stage_options(options: dict[str, Any] | None = None, **kwargs: Any):
    """The backend options for a pipeline stage: the user's, with ``split_backward`` added to the passes
    (``"auto"`` becomes every exact pass plus ``split_backward``)."""
    from memfit.config import make_options
    from memfit.techniques import stage_passes

    merged = dict(options or {})
    merged.update(kwargs)
    passes = stage_passes(merged.get("passes", "auto"))
    if "split_backward" not in passes:
        passes.append("split_backward")
    merged["passes"] = passes
    return make_options(merged)


def pipeline_stage(
    module: torch.nn.Module,
    stage_index: int,
    num_stages: int,
    device: torch.device | str,
    *,
    input_args: Any = None,
    output_args: Any = None,
    group: Any = None,
    options: dict[str, Any] | None = None,
    **kwargs: Any,
):
    """A ``PipelineStage`` running ``module`` compiled by memfit with its backward split into B and W.

    ``options``/keyword arguments are memfit's backend options (``budget``, ``inner``, ...). Give
    ``input_args`` (one microbatch's inputs) so the stage does not trace the module on meta tensors
    to infer shapes."""
    from torch._dynamo.eval_frame import OptimizedModule

    from memfit import MemfitBackend

    if isinstance(module, OptimizedModule):
        raise ValueError(
            "pipeline_stage() compiles the module itself (in place, with the split backward); pass the module "
            "before torch.compile, i.e. model._orig_mod"
        )
    backend = MemfitBackend(stage_options(options, **kwargs))
    backend.concurrent_calls = True  # the schedule runs microbatches' forwards ahead of their backwards
    module.compile(backend=backend)
    stage = _stage_class()(
        module,
        stage_index,
        num_stages,
        torch.device(device),
        # as the stage makes them at run time: received activations need grad, and so do outputs
        # that a later stage sends gradients back for (the stage reads requires_grad off these)
        input_args=_examples(input_args, requires_grad=stage_index > 0),
        output_args=_examples(output_args, requires_grad=stage_index < num_stages - 1),
        group=group,
        dw_builder=claim_weight_grads,
    )
    stage.memfit_backend = backend  # the records of what was compiled, for reports and tests
    return stage


def _stage_class():
    """``PipelineStage`` whose backward defers W (:func:`memfit.runtime.defer_weight_grads`): the schedule
    runs the W its ``dw_builder`` claimed when it says W (at once for a full backward, later for ZB)."""
    from torch.distributed.pipelining import PipelineStage

    from memfit.runtime import defer_weight_grads

    class MemfitPipelineStage(PipelineStage):
        def backward_one_chunk(self, *args: Any, **kwargs: Any):
            with defer_weight_grads():
                return super().backward_one_chunk(*args, **kwargs)

    return MemfitPipelineStage


def _examples(args: Any, *, requires_grad: bool):
    if args is None:
        return None
    one = isinstance(args, torch.Tensor)
    out = tuple(
        a.detach().requires_grad_(requires_grad and a.is_floating_point()) if isinstance(a, torch.Tensor) else a
        for a in ((args,) if one else args)
    )
    return out[0] if one else out


_RUNTIME_KIND = {"F": "F", "B": "I", "W": "W", "BW": "B"}


def stage_layout(name: str, rank: int, world: int, *, chunks: int = 2) -> list[int]:
    """The stage indices rank ``rank`` holds under schedule ``name``: ``[rank]``; V-shaped schedules
    (ZB-V, V-Half, V-Min) ``[rank, 2 world - 1 - rank]``; interleaved 1F1B ``rank + k world``."""
    from memfit.planner.schedule import SCHEDULES, V_SHAPED

    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; accepted: {', '.join(SCHEDULES)}")
    if name in V_SHAPED:
        return [rank, 2 * world - 1 - rank]
    if name == "1F1B-I":
        return [rank + k * world for k in range(chunks)]
    return [rank]


def rank_orders(name: str, world: int, n_microbatches: int, *, chunks: int = 2) -> dict[int, list[tuple[str, int, int]]]:
    """Per rank, the compute actions ``(kind, stage, microbatch)`` of schedule ``name`` in PyTorch's
    vocabulary (F; I = input gradients; W = weight gradients; B = both), checked: every action once,
    microbatches in range, each stage's forwards in microbatch order (the runtime files the last stage's
    losses in the order its forwards ran: out of order, gradients come out wrong without an error)."""
    from memfit.planner.schedule import orders_for

    orders, n_virtual, _ = orders_for(name, world, n_microbatches, chunks=chunks)
    out: dict[int, list[tuple[str, int, int]]] = {}
    seen: set = set()
    for r, ops in enumerate(orders):
        last_f: dict[int, int] = {}
        acts = []
        for op in ops:
            key = (op.kind, op.stage, op.mb)
            if key in seen or not 0 <= op.mb < n_microbatches or not 0 <= op.stage < n_virtual:
                raise AssertionError(f"{name}: bad or repeated action {key} on rank {r}")
            seen.add(key)
            if op.kind == "F":
                if op.mb != last_f.get(op.stage, -1) + 1:
                    raise AssertionError(f"{name}: stage {op.stage}'s forwards out of microbatch order on rank {r}")
                last_f[op.stage] = op.mb
            acts.append((_RUNTIME_KIND[op.kind], op.stage, op.mb))
        out[r] = acts
    return out


def schedule(stages: list, name: str, n_microbatches: int, loss_fn=None, *, chunks: int = 2, **kwargs: Any):
    """A ``torch.distributed.pipelining`` schedule that runs published schedule ``name`` (one of
    ``memfit.planner.schedule.SCHEDULES``) in the order memfit's simulator gives it, over this rank's
    ``stages`` (:func:`pipeline_stage` results, for the stage indices :func:`stage_layout` names).

    PyTorch's runtime (``_PipelineScheduleRuntime``) takes the compute order, places the sends and
    receives itself, and checks each rank's order before any communication, so a bad order fails on
    every rank at once instead of hanging. ``kwargs`` go to the runtime (``scale_grads``, ...)."""
    from torch.distributed.pipelining.schedules import _Action, _ComputationType, _PipelineScheduleRuntime

    if not stages:
        raise ValueError("schedule() needs this rank's stages")
    world, rank = stages[0].group_size, stages[0].group_rank
    want = stage_layout(name, rank, world, chunks=chunks)
    have = sorted(st.stage_index for st in stages)
    if have != sorted(want) or stages[0].num_stages != len(want) * world:
        raise ValueError(
            f"{name} over {world} ranks wants rank {rank} to hold stages {sorted(want)} of {len(want) * world}; "
            f"it holds {have} of {stages[0].num_stages} (see memfit.pipelining.stage_layout)"
        )
    order = rank_orders(name, world, n_microbatches, chunks=chunks)
    sched = _PipelineScheduleRuntime(sorted(stages, key=lambda st: st.stage_index), n_microbatches,
                                     loss_fn=loss_fn, **kwargs)
    sched.pipeline_order = {
        r: [_Action(stage, _ComputationType(kind), mb) for kind, stage, mb in acts] for r, acts in order.items()
    }
    sched._prepare_schedule_with_comms(sched.pipeline_order)  # validates, places sends/receives, maps stages
    sched.memfit_schedule = name
    return sched


__all__ = ["pipeline_stage", "rank_orders", "schedule", "stage_layout", "stage_options"]
