"""Hugging Face ``transformers`` models compiled whole, as their users call them.

``memfit.hf.compile(model, budget="6GiB")`` compiles a ``PreTrainedModel`` in place for training under
memfit, so that ``model(input_ids=..., labels=...).loss.backward()`` (and the ``Trainer``, which calls
the model the same way) reaches what memfit reaches through a loss function:

* **The logits are not returned in training with labels.** An HF LM returns its ``[tokens, vocab]``
  logits in the output object, so they are an output of the compiled graph and live to the end of the
  step: streaming the LM head cannot drop them. A 2-layer HF Llama (16k vocabulary, 1024 tokens, CPU,
  ``passes=["stream"]``) peaked at 159.72 MiB compiled whole and at 31.22 MiB with the logits left out
  of the output (199.57 MiB plain ``torch.compile``). In that mode the output's ``logits`` is ``None``,
  as with Liger-Kernel's and Cut Cross-Entropy's fused losses: the caller never receives a tensor that
  is not what the model would return. Eval mode, ``torch.no_grad()`` (``generate``) and calls without
  labels run the model's own forward, untouched and uncompiled.
* **One graph.** A model whose ``config.loss_type`` is unset (GPT-2 and others) resolves its loss
  through the ``loss_function`` property, which calls ``logger.warning_once``; Dynamo does not trace
  that and breaks the graph between the LM head and the loss. The property is read once here, outside
  the trace, and pinned through its own setter (the value HF would pick, unchanged).

Everything else is the model's own code, traced: the base model, ``get_output_embeddings()`` (tied or
not), Gemma 2's ``final_logit_softcapping``, ``logit_scale`` epilogues, ``num_items_in_batch``,
``shift_labels`` and ``ignore_index`` reach the graph as the model computes them, and the stream pass
finds the LM head and the loss in it (``docs/stream.md``). Nothing is rewritten per model family. A
model whose output embeddings are not a vocabulary projection (``get_output_embeddings()`` is None:
classification heads, whose logits are small) keeps its logits; the report says so.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from memfit.compiler.backend import MemfitBackend, make_backend
from memfit.errors import Note

#: The output field a training call with labels leaves out (``None`` in the output object).
LOGITS = "logits"


@dataclass(frozen=True)
class Compiled:
    """What :func:`compile` did to a model (``model.memfit``)."""

    backend: MemfitBackend
    """The backend the training forward is compiled with: its ``records``, ``report()``,
    ``write_report(path)``."""
    drops_logits: bool
    """Training calls with labels return ``logits=None`` (the LM head and the loss can be streamed)."""
    reason: str
    """Why the logits are dropped or kept (also a note in the report)."""
    forward: Callable
    """The model's own forward, restored by :func:`uncompile`."""


def _is_hf_model(model: Any) -> bool:
    return isinstance(model, torch.nn.Module) and hasattr(model, "config") and hasattr(model, "get_output_embeddings")


def _pin_loss_function(model: torch.nn.Module) -> None:
    """Resolve ``model.loss_function`` now and set it through its setter, so that the trace reads a
    plain attribute: transformers' property calls ``logger.warning_once`` when ``config.loss_type`` is
    unset, and Dynamo breaks the graph there (``torch._dynamo.explain`` on HF GPT-2: 2 graphs, 1 break;
    pinned: 1 graph)."""
    prop = getattr(type(model), "loss_function", None)
    if isinstance(prop, property) and prop.fset is not None and "_loss_function" not in model.__dict__:
        model.loss_function = model.loss_function


def _logits_decision(model: torch.nn.Module, keep_logits: bool) -> tuple[bool, str]:
    if keep_logits:
        return False, "logits kept (keep_logits=True): the LM head's [tokens, vocab] output lives to the end of the step"
    head = model.get_output_embeddings()
    if head is None:
        return False, (
            f"logits kept: {type(model).__name__}.get_output_embeddings() is None, so its logits are not a "
            "vocabulary projection (a classification head's logits are small)"
        )
    return True, (
        f"logits left out of training outputs with labels ({type(model).__name__}: output embeddings "
        f"{tuple(head.weight.shape)}): the output's logits is None, and the LM head and the loss may be streamed"
    )


def _labels_given(signature: inspect.Signature | None, args: tuple, kwargs: dict) -> bool:
    if kwargs.get("labels") is not None:
        return True
    if signature is None or not args:
        return False
    params = list(signature.parameters)
    return "labels" in params and params.index("labels") < len(args) and args[params.index("labels")] is not None


@contextlib.contextmanager
def _config_without_cache(model: torch.nn.Module):
    """``model.config.use_cache`` False for the training call, with gradient checkpointing on
    (``model.gradient_checkpointing_enable()``): the value the model would set itself. It turns the cache
    off after a ``logger.warning_once`` (in the model's forward, or, in an encoder such as
    ``BertForMaskedLM``, where its base model reads the config: ``merge_with_config_defaults``), which
    Dynamo does not trace: the graph broke inside the model, the logits became an output of the graph
    before the break, and a Llama with checkpointing on could not be planned under 24.00 MiB (its logits
    held) at a budget of 12.45. Set in the config, since not every forward takes ``use_cache`` (BERT's
    does not); restored after the call, so that evaluation and ``save_pretrained`` see it as it was."""
    cfg = getattr(model, "config", None)
    if not (getattr(model, "is_gradient_checkpointing", False) and getattr(cfg, "use_cache", False)):
        yield
        return
    cfg.use_cache = False
    try:
        yield
    finally:
        cfg.use_cache = True


def _without_logits(out: Any) -> Any:
    """``out`` rebuilt without its logits (a new object of its class: setting ``out.logits = None`` on
    the traced object still returned the logits from the graph)."""
    if getattr(out, "loss", None) is None or getattr(out, LOGITS, None) is None:
        return out
    return type(out)(**{k: v for k, v in out.items() if k != LOGITS})


def compile(  # noqa: A001  (memfit.hf.compile, as torch.compile)
    model: torch.nn.Module,
    options: dict | None = None,
    *,
    keep_logits: bool = False,
    dynamic: bool | None = False,
    **kwargs: Any,
) -> torch.nn.Module:
    """Compile ``model`` (a transformers ``PreTrainedModel``) in place for training under memfit.

    ``options`` / keywords are memfit's (``budget``, ``passes``, ``report``, ...; see
    :func:`memfit.backend`). Training calls (``model.train()``, gradients enabled) run the memfit-compiled
    forward; with labels, the output's ``logits`` is ``None`` (``keep_logits=True`` returns them, and the
    logits then bound the peak). Other calls run the model's own forward. Returns ``model`` itself, so that
    it can be handed to ``Trainer`` as it is; ``save_pretrained`` and ``generate`` see the model unchanged.

    ``dynamic=False`` (the default): each input shape gets its own plan (a budget is planned for sizes
    that are known; memfit's passes decline symbolic sizes). Pad batches to a few lengths
    (``pad_to_multiple_of``) to bound recompiles.
    """
    if not _is_hf_model(model):
        raise TypeError(
            f"memfit.hf.compile takes a transformers PreTrainedModel, got {type(model).__name__}; "
            "for another module use torch.compile(model, backend=memfit.backend(...))"
        )
    if getattr(model, "memfit", None) is not None:
        uncompile(model)
    backend = make_backend(options, **kwargs)
    drops, reason = _logits_decision(model, keep_logits)
    backend.model_notes.append(Note(reason, technique="stream", code="applied" if drops else "not_applied"))
    _pin_loss_function(model)
    forward = model.forward
    try:
        signature = inspect.signature(forward)
    except (TypeError, ValueError):
        signature = None

    def training_forward(*args: Any, **kw: Any) -> Any:
        out = forward(*args, **kw)
        return _without_logits(out) if drops and _labels_given(signature, args, kw) else out

    compiled = torch.compile(training_forward, backend=backend, dynamic=dynamic)

    @functools.wraps(forward)  # the signature the Trainer inspects (num_items_in_batch) is the model's
    def dispatch(*args: Any, **kw: Any) -> Any:
        if model.training and torch.is_grad_enabled():
            with _config_without_cache(model):
                return compiled(*args, **kw)
        return forward(*args, **kw)

    model.forward = dispatch
    model.memfit = Compiled(backend=backend, drops_logits=drops, reason=reason, forward=forward)
    return model


def uncompile(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`compile`: the model's own forward again (the pinned loss function stays: same value)."""
    done = getattr(model, "memfit", None)
    if done is None:
        return model
    if model.__dict__.get("forward") is not None:
        del model.forward
    del model.memfit
    if model.forward != done.forward:  # the forward was an instance attribute before compile
        model.forward = done.forward
    return model


__all__ = ["Compiled", "compile", "uncompile"]
