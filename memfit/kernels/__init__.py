"""memfit's own ops (``torch.ops.memfit.*``), one module per family, and the planner's models of them.

* :mod:`memfit.kernels.fewbit`: ``fewbit_pack`` / ``fewbit_grad``, Triton kernels beside the pure-torch
  references that define their results (:mod:`memfit.kernels.fewbit_tables`: the code tables).
* :mod:`memfit.kernels.stream`: ``stream`` / ``stream_backward``, the runtime of a region the stream
  pass runs chunk by chunk along the sequence.

Most ops need no model of their own: the memory model counts their outputs and the cost model prices
them by the roofline (the few-bit ops, on CPU, scaled by the device profile's measured ``slowdown``).
An op that runs graphs of its own cannot be priced that way; its module declares an :class:`OpModel`
per op in ``OP_MODELS``, and :func:`op_models` merges them. The planner takes that table as an argument
(``memory.simulate``, ``cost.node_time``, ``analysis.analyze_pairs``; by default this one, looked up
when called) rather than each kernel module writing into the planner's dicts when it is imported: what
the planner predicts then depends on what it is given, not on which modules were imported before.

This package imports none of its modules itself, so importing it (as the planner does, lazily) does
not load Triton or register any op.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Callable, Mapping

#: The modules whose ``OP_MODELS`` :func:`op_models` merges. The few-bit kernels declare none (see
#: above), and importing them loads Triton, so they are not listed; ``memfit.planner.scratch`` models
#: ATen's CPU convolutions.
_MODULES_WITH_MODELS = ("memfit.kernels.stream", "memfit.planner.scratch")


@dataclass(frozen=True)
class OpModel:
    """How the planner prices one opaque op, for ops whose cost is not that of their inputs and outputs."""

    scratch: Callable | None = None
    """``f(node) -> bytes`` the op allocates and frees inside itself (a stream op's chunk intermediates):
    the memory model counts them at the node, on top of its outputs."""
    time: Callable | None = None
    """``f(node, profile) -> seconds``, replacing the roofline estimate of the node (a stream op runs
    its chunk graphs once per chunk)."""
    inside_plans: bool = True
    """Whether the FX-level memory model counts the scratch under Inductor too. True for memfit's own
    ops (a stream op runs its chunk graphs the same whichever compiler called it); False for ATen ops
    Inductor calls as extern kernels with operands it lays out itself (convolutions channels-last),
    whose scratch only the replay of the compiled buffer plan counts, with Inductor's strides. The
    replay adds every op's scratch either way (:func:`memfit.planner.inductor_plan.replay`): a graph
    holding a stream op is composed from its compiled plan, not walked node by node, which missed
    Inductor allocating a fused kernel's outputs together (an HF Llama streamed at 7.03 MiB: walked
    6.58 MiB, measured 8.67)."""


@functools.lru_cache(maxsize=1)
def op_models() -> Mapping:
    """``{op overload: OpModel}`` of every kernel module, read-only. Imports those modules on first call
    (registering their ops), which is why the planner calls it only when it needs the table."""
    import importlib

    merged: dict = {}
    for name in _MODULES_WITH_MODELS:
        merged.update(importlib.import_module(name).OP_MODELS)
    return types.MappingProxyType(merged)
