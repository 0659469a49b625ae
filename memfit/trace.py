"""The standalone path: build a model's training graphs on fake tensors and analyse them.

A *target* names a factory: ``path/to/file.py`` or ``package.module``, optionally ``:name``
(default ``factory``). The factory takes no arguments and returns ``(model, inputs)`` or
``(model, inputs, loss_fn)``; ``inputs`` is a tuple of positional arguments, a dict of keyword
arguments, or one tensor.

The factory runs under a ``FakeTensorMode``: parameters and inputs have shapes, dtypes and devices
but no storage, so a 7B-parameter config costs no memory. (Fake, not meta: on the meta device
AOTAutograd traces no backward through ``nll_loss`` in torch 2.13, so a step with a cross-entropy
loss would lose its backward. Real tensors a factory returns anyway are converted to fake ones.) The step — forward, loss — goes through Dynamo and AOTAutograd with the
same partition function as the backend, so the graphs analysed are those the backend would compile
(except Inductor's joint-graph pattern rewrites, which are not run here).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from typing import Any, Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._pytree import tree_leaves

from memfit.config import make_options, split_target
from memfit.errors import is_note
from memfit.measurement import to_loss
from memfit.planner.analysis import StepAnalysis


class TargetError(ValueError):
    """A target that cannot be loaded or run; the message is one line meant for the user."""


def load_factory(target: str) -> Callable[[], Any]:
    """Resolve ``file.py[:name]`` or ``pkg.module[:name]`` to the factory callable."""
    target, name, is_file = split_target(target)
    if is_file:
        if not os.path.isfile(target):
            raise TargetError(f"no such file: {target}")
        mod_name = "_memfit_target_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(target))[0])
        spec = importlib.util.spec_from_file_location(mod_name, target)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module  # dataclasses look their module up here
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise TargetError(f"importing {target} failed: {type(e).__name__}: {_first_line(e)}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise TargetError(f"cannot import module {target!r}: {_first_line(e)}") from e
        except Exception as e:
            raise TargetError(f"importing {target} failed: {type(e).__name__}: {_first_line(e)}") from e
    factory = getattr(module, name, None)
    if factory is None:
        raise TargetError(f"{target} has no factory {name!r}; define {name}() returning (model, inputs[, loss_fn]) or name one with {target}:NAME")
    if not callable(factory):
        raise TargetError(f"{target}:{name} is not callable")
    return factory


class _Step(torch.nn.Module):
    """model + loss in one graph. It returns the loss and every other tensor the model returns:
    a caller of the compiled model holds those through the backward (an HF model's logits, say),
    and AOTAutograd gives each one that requires grad a zero tangent there, so both count."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable | None):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, args: tuple, kwargs: dict) -> tuple:
        out = self.model(*args, **kwargs)
        loss = to_loss(out, self.loss_fn)
        others = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t is not loss]
        return (loss, *others)


def build_step(factory: Callable[[], Any], *, fake: bool = True) -> tuple[torch.nn.Module, tuple, dict, Callable | None]:
    """Call the factory (under a FakeTensorMode unless ``fake=False``) and split what it returns."""
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    try:
        if mode is not None:
            with mode:
                made = factory()
        else:
            made = factory()
    except TargetError:
        raise
    except Exception as e:
        raise TargetError(f"the factory raised {type(e).__name__}: {_first_line(e)}") from e
    if not isinstance(made, (tuple, list)) or len(made) not in (2, 3):
        raise TargetError(f"the factory must return (model, inputs) or (model, inputs, loss_fn), got {type(made).__name__}")
    model, inputs = made[0], made[1]
    loss_fn = made[2] if len(made) == 3 else None
    if not isinstance(model, torch.nn.Module):
        raise TargetError(f"the factory's first result must be a torch.nn.Module, got {type(model).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise TargetError("the factory's third result (loss_fn) must be callable")
    if isinstance(inputs, torch.Tensor):
        args, kwargs = (inputs,), {}
    elif isinstance(inputs, dict):
        args, kwargs = (), dict(inputs)
    elif isinstance(inputs, (tuple, list)):
        args, kwargs = tuple(inputs), {}
    else:
        raise TargetError(f"the factory's inputs must be a tuple, a dict or a tensor, got {type(inputs).__name__}")
    if mode is not None:

        def to_fake(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor):
                return mode.from_tensor(x)
            return x

        with torch.no_grad():
            for m in model.modules():
                for k, p in list(m._parameters.items()):
                    if p is not None and not isinstance(p, FakeTensor):
                        m._parameters[k] = torch.nn.Parameter(mode.from_tensor(p), requires_grad=p.requires_grad)
                for k, b in list(m._buffers.items()):
                    if b is not None and not isinstance(b, FakeTensor):
                        m._buffers[k] = mode.from_tensor(b)
        args = tuple(to_fake(a) for a in args)
        kwargs = {k: to_fake(v) for k, v in kwargs.items()}
    return model, args, kwargs, loss_fn


def trace_step(target: str | Callable[[], Any], *, progress: Callable[[str], None] | None = None,
               curve_points: int = 0, strict: bool = True, **options: Any):
    """Trace (and, with a budget, plan) one training step of a factory's model on fake tensors.

    Returns ``(backend, param_bytes)``: the backend holds a record of every graph. ``options`` are backend
    options; ``progress`` gets a line at each stage; ``curve_points``: checkpoint plans to evaluate per
    graph for the report's budget-vs-time curve; ``strict=False``: a graph no plan fits keeps its
    smallest-peak plan and the reason (``backend.infeasible``) instead of raising ``BudgetError``.
    """
    from memfit import BudgetError, MemfitBackend

    opts = make_options(options)
    factory = load_factory(target) if isinstance(target, str) else target
    if progress:
        progress("building the model on fake tensors")
    model, args, kwargs, loss_fn = build_step(factory)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if not any(p.requires_grad for p in model.parameters()):
        raise TargetError("no parameter of the model requires grad; there is no training step to analyse")
    be = MemfitBackend(opts)
    be.progress = progress
    be.curve_points = curve_points
    be.strict = strict
    step = _Step(model, loss_fn).train(model.training)
    torch._dynamo.reset()
    if progress:
        progress("tracing the training step (Dynamo, AOTAutograd)")
    seen = []

    def count(gm, example_inputs):
        seen.append(gm)
        return be.analysis_compiler(gm, example_inputs)

    try:
        compiled = torch.compile(step, backend=count, dynamic=False)
        compiled(args, kwargs)
    except (TargetError, BudgetError):  # Dynamo passes BudgetError through unwrapped
        raise
    except Exception as e:
        raise TargetError(f"tracing the training step failed: {type(e).__name__}: {_first_line(e)}") from e
    finally:
        torch._dynamo.reset()
    if not seen:
        rnn = next((type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.RNNBase)), None)
        why = (f"the model holds an {rnn}, and Dynamo skips a frame that runs one unless "
               "torch._dynamo.config.allow_rnn = True (set it in the target file, and in your training script)"
               if rnn else "torch._dynamo.explain(model)(*inputs) says why")
        raise TargetError(f"Dynamo compiled no graph of this step: it ran eagerly, so there is nothing memfit can plan; {why}")
    if not be.records:
        raise TargetError("no training graph was produced (does the loss depend on the parameters?)")
    for r in be.records:  # module paths are relative to the _Step wrapper
        for d in r.decisions:
            d["module"] = _unwrap(d["module"])
    return be, param_bytes


def _unwrap(module: str) -> str:
    return module[len("model.") :] if module.startswith("model.") else module.replace("model", "", 1)


def analyze(target: str | Callable[[], Any], **options: Any) -> StepAnalysis:
    """Analyse one training step of a factory's model on fake tensors (no real memory).

    ``target`` is a factory or a target string; ``options`` are backend options (``inner`` picks
    which partition and decompositions the graphs get, ``device`` the cost-model profile).
    """
    be, param_bytes = trace_step(target, **options)
    analysis = be.step_analysis(param_bytes=param_bytes)
    if any(r.before_pair is not None for r in be.latest_records()):  # a plan changed the step: show it beside
        before = be.before_analysis(param_bytes=param_bytes)
        if (before.memory.peak_bytes, before.memory.saved_bytes) != (analysis.memory.peak_bytes, analysis.memory.saved_bytes):
            analysis.before = before
    analysis.plans = [r.plan for r in be.records if r.plan is not None]
    analysis.fewbit_plans = [r.fewbit for r in be.records if r.fewbit is not None]
    for r in be.records:
        analysis.notes.extend(n for n in r.notes if _analysis_note(n))
        analysis.notes.extend(n for n in r.notes if is_note(n, "left_exact"))
    for b in analysis.memory.buffers:
        b.module = _unwrap(b.module)
    return analysis


def _analysis_note(note: str) -> bool:
    """The notes ``memfit analyze`` prints: every checkpoint, share-norms, split-backward and auto decision, what fits
    unchanged, and why few-bit did not apply (sites it left exact follow, after the rest)."""
    return (getattr(note, "technique", None) in ("checkpoint", "split_backward", "auto", "share_norms")
            or is_note(note, "not_needed")
            or (getattr(note, "technique", None) == "fewbit" and getattr(note, "code", None) in ("not_applied", "nothing_to_do")))


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else ""
