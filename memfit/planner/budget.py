"""What the step may use: a ``budget`` given directly, or what a ``device_memory`` leaves after the
resident bytes.

``budget`` is the peak of the training step above what is resident when it starts — the memory
model's definition (parameters and optimizer state are resident; activations, gradients and the
backward's temporaries are the step's). Users think in whole devices ("80 GB H100"), so
``device_memory`` is accepted too and the resident part is subtracted, named in the report:

* parameters: the bytes of every parameter the compiled graphs take (all graphs seen so far);
* optimizer state: ``OPTIMIZER_STATES[optimizer]`` tensors per parameter, in the parameter's dtype
  (as ``torch.optim`` keeps them: AdamW on a bf16 Llama-3-8B holds 2 x 15 GiB);
* on a GPU, the allocator's own figure (``torch.cuda.memory_allocated``) when it is larger: it
  counts what memfit cannot see (buffers, other models, a loaded optimizer state).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memfit.units import format_bytes

#: State tensors per parameter kept by each optimizer (same shape and dtype as the parameter).
from memfit.config import OPTIMIZER_STATES  # noqa: E402  (checked with the options, without torch)


@dataclass(frozen=True)
class StepBudget:
    """The budget of one step, and how it was derived (for the report's verdict)."""

    budget: int | None
    """Bytes the step may use above resident memory; ``None``: no limit."""
    device_memory: int | None = None
    resident: tuple[tuple[str, int], ...] = ()
    """What was subtracted from ``device_memory``: (what, bytes)."""

    @property
    def resident_bytes(self) -> int:
        return sum(b for _, b in self.resident)

    def describe(self) -> str:
        if self.device_memory is None:
            return f"budget {format_bytes(self.budget)} above resident memory"
        parts = " - ".join(f"{format_bytes(b)} {what}" for what, b in self.resident) or "nothing resident"
        return f"device {format_bytes(self.device_memory)} - {parts} = {format_bytes(self.budget)} for the step"

    def to_json(self) -> dict:
        return {
            "budget": self.budget,
            "device_memory": self.device_memory,
            "resident": [{"what": w, "bytes": b} for w, b in self.resident],
        }


class ResidentTooLarge(ValueError):
    """What is resident does not leave any memory for the step."""


def step_budget(
    *,
    budget: int | None,
    device_memory: int | None,
    param_bytes: int,
    optimizer: str | None,
    device: torch.device | None = None,
) -> StepBudget:
    """The step's budget from the user's options and what is resident."""
    if device_memory is None:
        return StepBudget(budget)
    n_states = OPTIMIZER_STATES.get(optimizer or "", 0)
    resident = [("parameters", param_bytes)]
    if optimizer is None:
        resident.append(("optimizer state (none counted: give optimizer=, e.g. 'adamw')", 0))
    else:
        resident.append((f"{optimizer} state ({n_states} per parameter)", n_states * param_bytes))
    if device is not None and device.type == "cuda" and torch.cuda.is_available():  # pragma: no cover - GPU only
        allocated = torch.cuda.memory_allocated(device)
        counted = sum(b for _, b in resident)
        if allocated > counted:
            resident.append(("other allocations (the CUDA allocator's figure beyond the above)", allocated - counted))
    left = device_memory - sum(b for _, b in resident)
    if left <= 0:
        parts = ", ".join(f"{w} {format_bytes(b)}" for w, b in resident if b)
        raise ResidentTooLarge(
            f"what is resident ({parts}) already fills the device memory of {format_bytes(device_memory)}: no plan "
            "for the step's activations can help; keep parameters/optimizer state in bf16, shard them (FSDP2), or "
            "split the model into pipeline stages (memfit.pipelining)"
        )
    return StepBudget(left, device_memory, tuple(resident))


@dataclass(frozen=True)
class StepFloor:
    """What one training graph needs at the very least, whatever memfit plans: no plan's peak is lower.

    * the parameters' gradients: all of them are alive when the backward ends (the step starts with
      none: ``zero_grad(set_to_none=True)``, as the memory model and ``memfit.measure`` assume);
    * the largest single op: its output and its inputs that are not the graph's (activations) exist at
      once while it runs, in the forward of any plan.

    It is known from the Dynamo graph alone, so a budget below it is refused before any planning (a
    1-byte budget took 60 s of search to refuse on ``examples/gpt.py``, issue 21)."""

    grads: int
    op: int
    op_name: str = ""

    @property
    def bytes(self) -> int:
        return max(self.grads, self.op)

    def describe(self) -> str:
        grads = f"its parameters' gradients take {format_bytes(self.grads)} (all alive when the backward ends)"
        if not self.op_name:
            return grads
        return f"{grads} and its largest single op, {self.op_name}, {format_bytes(self.op)} (output and activation inputs)"


def step_floor(gm: torch.fx.GraphModule, example_inputs, ops: bool = True) -> StepFloor:
    """The :class:`StepFloor` of a Dynamo graph from its example values (symbolic sizes count as 0).

    ``ops=False``: where the stream pass may run, an op's size bounds nothing (a streamed LM head's logits
    never exist whole: an HF Llama's 8 MiB op, refused at 7 MiB, fits streamed in 6.7 MiB); only the
    gradients count."""

    def nbytes(v) -> int:
        if not isinstance(v, torch.Tensor):
            return 0
        try:
            return int(v.numel()) * v.element_size()
        except Exception:  # noqa: BLE001 - a data-dependent or symbolic size: no lower bound from it
            return 0

    def real(v) -> bool:  # an allocation of its own, not a view of another tensor
        return isinstance(v, torch.Tensor) and not v._is_view()

    grads = sum(nbytes(x) for x in example_inputs if isinstance(x, torch.nn.Parameter) and x.requires_grad)
    best, name = 0, ""
    for node in gm.graph.nodes if ops else ():
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        outs = node.meta.get("example_value")
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        total = sum(nbytes(v) for v in outs if real(v))
        if not total:
            continue
        seen = set()
        for a in node.all_input_nodes:
            v = a.meta.get("example_value")
            if a.op != "placeholder" and real(v) and id(v) not in seen:
                seen.add(id(v))
                total += nbytes(v)
        if total > best:
            best, name = total, node.name
    return StepFloor(grads, best, name)

