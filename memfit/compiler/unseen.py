"""A warning when Dynamo runs a frame compiled for a budgeted memfit backend eagerly, whole.

Dynamo gives up on some frames before any graph reaches the backend: an ``nn.LSTM`` (unless
``torch._dynamo.config.allow_rnn``), a data-dependent ``nonzero()`` inside a loop, ... The frame then
runs eagerly, every time, and memfit is never called, so nothing it does can keep the budget: an LSTM
language model measured 1.6x its budget and a mixture-of-experts layer 1.67x, without a word.

Backends are told nothing about such frames, but Dynamo runs start and end callbacks around each frame
it compiles (``torch._dynamo.callback_handler``). The end callback here looks for memfit among the
compiler functions on the stack (``_compile``'s ``compiler_fn``), and when the frame compiled no graph
(``counters["frames"]["ok"]`` did not move) and Dynamo recorded why (``counters["unimplemented"]``), it
warns once per frame with Dynamo's own reason and hint. It cannot refuse (an exception there would
leave Dynamo's callback bookkeeping broken for the rest of the process), so ``strict=True`` does not
apply to it. Registered when the backend module is imported (``torch.compile(backend="memfit")``
imports it at the call, before any frame is compiled), and again at every ``torch.compile`` and
memfit backend creation, since ``torch._dynamo.reset()`` drops registered callbacks.
"""

from __future__ import annotations

import sys
import warnings

_state: dict = {"ok": 0, "unimplemented": {}, "said": set()}


def install() -> None:
    """Register the callbacks (again: ``torch._dynamo.reset()`` clears every registered callback, so
    this runs at each ``torch.compile`` and each memfit backend's creation; idempotent)."""
    try:
        import torch._dynamo

        handler = torch._dynamo.callback_handler
        if _start not in handler.start_callbacks:
            handler.register_start_callback(_start)
        if _end not in handler.end_callbacks:
            handler.register_end_callback(_end)
    except Exception:  # noqa: BLE001 - a torch without the callbacks: nothing to hook
        return


def _counters():
    from torch._dynamo.utils import counters

    return counters["frames"].get("ok", 0), dict(counters["unimplemented"])


def _start(_args) -> None:
    _state["ok"], _state["unimplemented"] = _counters()


def _memfit_budget(compiler_fn) -> int | None:
    """The budget of the memfit backend ``compiler_fn`` is (or wraps); None: not memfit, or no budget."""
    from memfit.compiler.backend import MemfitBackend
    from memfit.config import make_options

    fn = getattr(compiler_fn, "_torchdynamo_orig_backend", compiler_fn)
    fn = getattr(fn, "compiler_fn", None) if isinstance(getattr(fn, "compiler_fn", None), MemfitBackend) else fn
    if isinstance(fn, MemfitBackend):
        return fn.options.budget or fn.options.device_memory
    if getattr(fn, "compiler_name", None) == "memfit":
        try:
            opts = make_options(getattr(fn, "kwargs", {}).get("options"))
        except ValueError:
            return None
        return opts.budget or opts.device_memory
    return None


def _end(_args) -> None:
    try:
        _check()
    except Exception:  # noqa: BLE001 - never break Dynamo's compile over a warning
        pass


def _check() -> None:
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_code.co_name == "_compile" and "compiler_fn" in frame.f_locals):
        frame = frame.f_back
    if frame is None or _memfit_budget(frame.f_locals["compiler_fn"]) is None:
        return
    ok, unimplemented = _counters()
    if ok > _state["ok"]:
        return  # the frame compiled (its graph breaks, if any, are the backend's to report)
    new = [k for k, v in unimplemented.items() if v > _state["unimplemented"].get(k, 0)]
    code = frame.f_locals.get("code")
    where = f"{code.co_name} ({code.co_filename}:{code.co_firstlineno})" if code is not None else "a frame"
    if not new or where in _state["said"]:
        return
    _state["said"].add(where)
    lines = [ln.strip() for ln in str(new[0]).splitlines() if ln.strip()]
    reason = lines[0] if lines else "unsupported code"
    hints = [ln for ln in lines[1:] if ln.startswith("Hint:")][:1]
    warnings.warn(
        f"memfit: Dynamo compiled no graph of {where}: it runs eagerly, outside any plan, so memfit cannot "
        f"keep the budget for it. Dynamo's reason: {reason}" + (f" ({hints[0]})" if hints else "")
        + ". torch._dynamo.explain(model)(*inputs) shows where; make it traceable",
        stacklevel=2,
    )


__all__ = ["install"]
