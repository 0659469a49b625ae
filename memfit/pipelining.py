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


__all__ = ["pipeline_stage", "stage_options"]
