"""The ``torch.compile`` backend: the options, the entry point, and the committed records.

Flow for one Dynamo graph that needs gradients (see ``docs/layout.md``)::

    Dynamo FX graph ─> MemfitBackend.__call__ ─> a search (memfit.compiler.search) runs Attempts
        Attempt: AOTAutograd ─> joint graph ─> Attempt.partition (plan → passes) ─> forward, backward
                                                                   └─> inner compiler (+ buffer plans)
    ─> the backend commits the kept attempt's records and writes the report once

* ``inner="eager"``: ``aot_autograd`` with memfit's partition function and boxed eager compilers
  (the graphs run op by op, freeing each value after its last use, and the backward clears its
  argument list so saved activations die at their last use, as under Inductor). With no plan, the
  partition is AOTAutograd's ``default_partition``: it saves what eager autograd would save.
* ``inner="inductor"``: Inductor's own ``compile_fx`` (its decompositions, joint-graph passes and
  output-stride rules are easy to get subtly wrong when re-implemented), with memfit's partition
  function installed as Inductor's ``custom_partitioner_fn`` and memfit's compiler wrapped around
  ``compile_fx_inner``. With no plan, the partition is the min-cut that plain ``torch.compile`` uses,
  so memfit with no passes is never worse than what the user had.

Graphs that need no gradients (``torch.no_grad``, or no input requires grad) go straight to the
inner compiler. Every graph compiled leaves a :class:`~memfit.compiler.records.GraphRecord` on the
backend (and in the ``report=`` file): its forward and backward, the memory model's prediction and the
decisions taken.
"""

from __future__ import annotations

import functools
import json
import sys
import warnings
import weakref
from typing import Any, Callable, Sequence

import torch
import torch.fx

from memfit.compiler import search
from memfit.compiler.attempt import Attempt
from memfit.compiler.records import GraphRecord
from memfit.config import Options, make_options
from memfit.errors import BudgetError, Note, OptionsError, UnplannedCodeError
from memfit.planner import choice
from memfit.planner.analysis import StepAnalysis, analyze_pairs
from memfit.techniques import APPROXIMATE, auto_streams, enabled
from memfit.units import format_bytes


def _symbolic(t: torch.Tensor) -> bool:
    return any(not isinstance(d, int) for d in t.shape)


def _requires_grad(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.requires_grad


class MemfitBackend:
    """A ``torch.compile`` backend; build it with :func:`memfit.backend`."""

    def __init__(self, options: Options):
        self.options = options
        self.records: list[GraphRecord] = []
        """The graphs compiled so far (committed from the attempts kept), in compile order."""
        self.inference_graphs = 0
        self.param_inputs: tuple[bool, ...] | None = None
        self.param_values: tuple = ()
        """Which inputs of the graph being compiled are parameters (see GraphPair)."""
        self.param_bytes: dict[int, int] = {}
        """id -> bytes of every live parameter the graphs took (the resident part of ``device_memory``); a
        parameter leaves when it is collected."""
        self.compiled_param_bytes = 0
        """The parameter bytes at the last commit (what the report states; the CLI's fake parameters are
        collected once the trace ends)."""
        self.device: torch.device | None = None
        self.curve_points = 8 if options.report else 0
        """Checkpoint plans evaluated per graph, at least (the report's budget-vs-time curve)."""
        self.progress: Callable[[str], None] | None = None
        """Called with a line of progress while planning (the CLI draws a bar from it)."""
        self.strict = True
        """False: when no plan fits, keep the smallest-peak plan and record why (for ``memfit plan``'s
        report) instead of raising :class:`BudgetError`."""
        self.infeasible: list[str] = []
        """The messages of the graphs no plan fitted (``strict=False``)."""
        self.returned: tuple[int, tuple[int, ...]] | None = None
        """(bytes, shape) of the largest non-scalar output that requires grad of the graph being compiled: what
        the caller holds to the end of the step (an HF model's logits); the error's hints name it."""
        self.model_notes: list[str] = []
        """Notes about the model rather than one graph (``memfit.hf.compile``'s choice on the logits); the
        report lists them first."""
        self._breaks_said: set[str] = set()
        self.concurrent_calls = False
        """True for a pipeline stage: its schedule runs several microbatches' forwards before their
        backwards by design, so a graph running again before its backward is not warned about."""

    def __repr__(self) -> str:
        return f"memfit.backend({self.options})"

    # -- entry points ----------------------------------------------------------------------------
    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        if not torch.is_grad_enabled() or not any(_requires_grad(x) for x in example_inputs):
            self.inference_graphs += 1
            return self._inner_inference(gm, example_inputs)
        self.note_inputs(example_inputs)
        self.note_outputs(gm)
        break_note = self._graph_break() if self.options.budget is not None or self.options.device_memory else None
        compile_one = search.compile_eager if self.options.inner == "eager" else search.compile_inductor
        try:
            attempt = self._search(compile_one, gm, example_inputs)
        except BudgetError as e:
            self._write_report(refused=e)
            raise
        if break_note is not None and attempt.records:
            attempt.records[0].notes.append(Note(break_note, None, "graph_break"))
        return self._commit(attempt)

    def _graph_break(self) -> str | None:
        """The warning for a graph Dynamo ends at a graph break (None: it ends where the frame returns).

        The code from the break to the next graph runs eagerly: memfit neither sees nor plans what it
        allocates (an ``nn.LSTM`` Dynamo will not trace, a ``.item()``, a print), so the budget holds only
        for the graphs. Said once per break location; ``strict=True`` refuses instead. Reads the reason
        Dynamo gives its own compile (``compile_subgraph_reason``; torch 2.13 passes a backend nothing
        about breaks), so a torch without it is simply not warned."""
        try:
            from torch._dynamo.symbolic_convert import InstructionTranslator

            reason = InstructionTranslator.current_tx().output.compile_subgraph_reason
        except Exception:  # noqa: BLE001 - not inside Dynamo (a direct call), or internals moved
            return None
        if reason is None or not reason.graph_break:
            return None
        where = reason.user_stack[-1] if reason.user_stack else None
        at = f"{where.filename}:{where.lineno}" if where is not None else "an unknown line"
        if at in self._breaks_said:
            return None
        self._breaks_said.add(at)
        why = str(reason.reason).strip().splitlines()[0] if reason.reason else "unsupported code"
        msg = (
            f"memfit: the step has a graph break at {at} ({why}): the code from there to the next compiled "
            "graph runs eagerly, outside any plan, and memfit cannot see or bound what it allocates, so the "
            "budget holds for the compiled graphs only. torch._dynamo.explain(model)(*inputs) lists every break; "
            "make that code traceable (or compile with fullgraph=True to be stopped at each), or pass strict=True "
            "to refuse such a step"
        )
        if self.options.strict:
            raise UnplannedCodeError(msg)
        warnings.warn(msg, stacklevel=2)
        return msg

    def analysis_compiler(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        """Trace and partition as the backend would, then run the graphs eagerly (for fake tensors);
        see :func:`memfit.compiler.search.compile_analysis`."""
        self.note_inputs(example_inputs)
        return self._commit(self._search(search.compile_analysis, gm, example_inputs))

    def _search(self, compile_one: search.CompileOne, gm, example_inputs) -> Attempt:
        self._refuse_below_floor(gm, example_inputs)
        if "stream" in self.passes:
            gm, notes = search.stream(self, gm, example_inputs)
            attempt = compile_one(self, gm, example_inputs, notes)
            search.stream_decisions(attempt, gm)
            return attempt
        if self.auto_streams:
            return search.stream_or_not(self, compile_one, gm, example_inputs)
        return compile_one(self, gm, example_inputs, [])

    def _refuse_below_floor(self, gm, example_inputs) -> None:
        """Refuse at once a budget below what the graph needs whatever the plan (``StepFloor``)."""
        from memfit.planner.budget import step_floor

        budget = self.step_budget().budget
        if budget is None or not choice.REFUSE_BELOW_FLOOR:
            return
        # a streamed op's output never exists whole (the logits of an LM head): its size bounds nothing
        floor = step_floor(gm, example_inputs, ops="stream" not in self.passes and not self.auto_streams)
        if floor.bytes <= budget:
            return
        err = BudgetError(floor.bytes, budget, hints=[
            f"a budget of more than {format_bytes(floor.bytes)}: {floor.describe()}", *self.hints(floor.bytes)], message=(
            f"memfit: the budget of {format_bytes(budget)} ({budget} bytes) is below what this step needs at the very "
            f"least, {format_bytes(floor.bytes)}: {floor.describe()}. No plan can go below that, so none was searched. "
            f"To fit: a budget of more than {format_bytes(floor.bytes)} (the smallest peak memfit reaches is higher: "
            "plan with a budget above this one to learn it), or shrink the batch or sequence, or split the model "
            "across devices (pipeline stages, FSDP)"))
        err.at_least = True
        raise err

    def _commit(self, kept: Attempt) -> Callable:
        """Keep what the attempt recorded, and write the report once."""
        self.records.extend(kept.records)
        self.infeasible.extend(kept.infeasible)
        self.compiled_param_bytes = sum(self.param_bytes.values())
        self._write_report()
        training = [r for r in kept.records if r.analysis.memory.saved_bytes]
        if training and training[-1].budget is not None and training[-1].budget.budget is not None:
            from memfit.compiler.retain import watch_retained_graph

            r = training[-1]
            return watch_retained_graph(kept.compiled, r.name, r.analysis.memory.saved_bytes, r.peak_bytes,
                                        r.budget.budget, concurrent_calls=self.concurrent_calls)
        return kept.compiled

    def _inner_inference(self, gm, example_inputs):
        if self.options.inner == "eager":
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    # -- what attempts read -------------------------------------------------------------------
    def note_inputs(self, example_inputs: Sequence[Any]) -> None:
        """Remember which inputs of the graph about to be compiled are parameters (see GraphPair)."""
        self.param_inputs = tuple(isinstance(x, torch.nn.Parameter) for x in example_inputs)
        # the parameters' values now, for checks that read them (share_norms: γ without zeros); weak, so a
        # deleted model's parameters are not kept alive by a backend shared between compiles
        self.param_values = tuple(weakref.ref(x) if isinstance(x, torch.nn.Parameter) else None for x in example_inputs)
        for x in example_inputs:
            if isinstance(x, torch.nn.Parameter) and id(x) not in self.param_bytes:
                self.param_bytes[id(x)] = x.numel() * x.element_size()
                # A parameter counts as resident while it lives: the backend ``backend="memfit"`` shares
                # between compiles with equal options would otherwise count a deleted model's parameters
                # for the next model (8 MiB of them halved a 20 MiB device_memory budget).
                weakref.finalize(x, self.param_bytes.pop, id(x), None)
            if isinstance(x, torch.Tensor) and self.device is None:
                self.device = x.device

    def note_outputs(self, gm: torch.fx.GraphModule) -> None:
        """Remember the largest tensor the graph returns that requires grad (see ``returned``)."""
        out = next((n for n in gm.graph.nodes if n.op == "output"), None)
        vals = [a.meta.get("example_value") for a in (out.all_input_nodes if out is not None else ())]
        sizes = [
            (v.numel() * v.element_size(), tuple(v.shape))
            for v in vals
            if isinstance(v, torch.Tensor) and v.requires_grad and v.dim() > 0 and not _symbolic(v)
        ]
        self.returned = max(sizes) if sizes else None

    def step_budget(self):
        """The step's budget: ``budget``, or what ``device_memory`` leaves after the resident bytes of the
        parameters seen so far (with graph breaks, an early graph sees only its own) and the optimizer."""
        from memfit.planner.budget import ResidentTooLarge, step_budget

        try:
            return step_budget(
                budget=self.options.budget,
                device_memory=self.options.device_memory,
                param_bytes=sum(self.param_bytes.values()),
                optimizer=self.options.optimizer,
                device=self.device,
            )
        except ResidentTooLarge as e:
            raise BudgetError(0, 0, message=f"memfit: {e}") from None

    @property
    def passes(self) -> tuple[str, ...]:
        """The passes this backend may run as candidates (see :func:`memfit.techniques.enabled`)."""
        return enabled(self.options.passes, self.options.allow_approximation)

    @property
    def auto_streams(self) -> bool:
        """``passes="auto"`` with a budget: stream plans are weighed against the plan without them."""
        return auto_streams(self.options.passes) and self.step_budget().budget is not None

    @property
    def fused(self) -> bool:
        """Whether the inner compiler fuses pointwise ops (what the memory model should assume)."""
        return self.options.inner == "inductor"

    @property
    def plan_margin(self) -> float:
        """The fraction of the budget a plan aims at (:func:`memfit.planner.choice.plan_margin`)."""
        return choice.plan_margin(self.fused)

    def decompositions(self) -> dict:
        """Inductor's decomposition table, less the derivative ops the few-bit pass rewrites (when on)."""
        from torch._inductor.decomposition import select_decomp_table

        table = select_decomp_table()
        if "fewbit" in self.passes:
            from memfit.passes.fewbit import HELD_BACK

            table = {k: v for k, v in table.items() if k not in HELD_BACK}
        return table

    def hints(self, smallest: int | None = None, margin: float = 1.0) -> list[str]:
        """What else could make a step fit (for the error when no plan does)."""
        hints = []
        sb = self.step_budget()
        if smallest is not None and sb.device_memory is not None:
            need = sb.resident_bytes + smallest / margin
            hints.append(
                f"a device of at least {format_bytes(need)} ({format_bytes(sb.resident_bytes)} resident + the smallest "
                f"plannable step), or less resident memory (a lighter optimizer state, sharding)"
            )
        if not self.options.allow_approximation and any(p not in self.passes for p in APPROXIMATE):
            hints.append(
                "allow approximation (allow_approximation=True, or --allow-approximation): few-bit activation "
                "gradients store 1-4-bit codes instead of activation inputs"
            )
        if self.returned is not None and smallest and self.returned[0] * 10 >= smallest:
            nbytes, shape = self.returned
            hints.append(
                f"return less: the graph returns a {list(shape)} tensor ({format_bytes(nbytes)}) that the caller holds to "
                "the end of the step (an HF model's logits); compile a function that returns the loss alone, or, for a "
                "transformers model, memfit.hf.compile(model, ...) (training outputs with labels then have logits=None)"
            )
        hints.append(
            "split the model into pipeline stages (memfit.pipelining.pipeline_stage): each stage holds only its own "
            "layers' activations and gradients"
        )
        hints.append("shrink the microbatch or the sequence")
        return hints

    # -- what was compiled ---------------------------------------------------------------------
    def latest_records(self) -> list[GraphRecord]:
        """The training graphs of one step, in the order a step runs them: a recompile of the same code
        (same Dynamo frame) replaces its earlier version."""
        latest: dict[Any, GraphRecord] = {}  # keeps the order in which frames first compiled
        for i, r in enumerate(self.records):
            latest[r.frame if r.frame is not None else f"#{i}"] = r
        return list(latest.values())

    def step_analysis(self, param_bytes: int | None = None, *, replayed: bool = True) -> StepAnalysis:
        """One analysis of a step made of the training graphs compiled so far (see ``latest_records``).

        ``replayed``: graphs Inductor compiled are replayed from its buffer plans (the step as it will
        run); False: every graph is estimated from its nodes, as the planner and ``memfit analyze`` do."""
        records = self.latest_records()
        pairs = [r.pair for r in records]
        plans = {k: v for r in records for k, v in r.buffer_plans.items()} if replayed else {}
        analysis = analyze_pairs(
            pairs, device=self.options.device, param_bytes=param_bytes, fused=self.fused, buffer_plans=plans
        )
        if len(pairs) > 1:
            analysis.notes.append(
                f"the step was split into {len(pairs)} graphs (graph breaks); an output passed to the next "
                "graph is counted as live to the end of the step (the caller may hold it, as an HF output "
                "holds the logits), and the input gradients a graph returns as the incoming gradients of "
                "the graph before it, freed where that graph's backward drops them"
            )
        return analysis

    def before_analysis(self, param_bytes: int | None = None) -> StepAnalysis:
        """The same step with no memfit pass: each graph's baseline partition (``before_pair``), and a
        graph the plan left unchanged replayed from its buffer plans where Inductor compiled it (what
        the report calls "before" and ``memfit analyze`` prints beside a plan)."""
        records = self.latest_records()
        unchanged = {k: v for r in records if r.before_pair is None for k, v in r.buffer_plans.items()}
        return analyze_pairs([r.before_pair or r.pair for r in records], device=self.options.device,
                             param_bytes=param_bytes, fused=self.fused, buffer_plans=unchanged or None)

    # -- report ------------------------------------------------------------------------------
    def report(self) -> dict:
        return {
            "options": {
                k: (list(v) if isinstance(v, tuple) else v if k != "fewbit_calibration" else v is not None)
                for k, v in self.options.__dict__.items()
            },
            "inference_graphs": self.inference_graphs,
            "graphs": [r.to_json() for r in self.records],
        }

    def _write_report(self, refused: BudgetError | None = None) -> None:
        """``report=`` ending in .html or .md: the planning report (all three forms, see
        ``memfit.planner.report.write``); any other path: this backend's JSON record of every graph.
        ``refused``: the compile was refused, and the report says so (a refusal wrote none)."""
        path = self.options.report
        if not path:
            return
        from memfit.planner import report as rp

        if path.lower().endswith((".html", ".htm", ".md")):
            rp.write(rp.refusal(refused, graphs=len(self.records)) if refused else rp.build_report(self), path)
            return
        with open(path, "w") as f:
            json.dump(rp.refusal(refused, graphs=len(self.records)) if refused else self.report(), f, indent=1)

    def write_report(self, path: str, *, title: str = "", measured: dict | None = None) -> list[str]:
        """Write the planning report of the graphs compiled so far (HTML, Markdown and JSON beside each
        other); ``measured`` attaches a real run: ``{"baseline": m0, "memfit": m1}`` with ``m`` from
        :func:`memfit.measure`. Returns the paths written."""
        from memfit.planner import report as rp

        return rp.write(rp.build_report(self, title=title, measured=measured), path)


def make_backend(options: dict[str, Any] | None = None, **kwargs: Any) -> MemfitBackend:
    """A memfit backend for ``torch.compile(model, backend=memfit.backend(budget="6GiB"))``.

    Options (also accepted as ``options={...}``): ``budget`` (bytes or "6GiB"; None: no limit),
    ``passes`` ("auto" or pass names), ``device`` ("h100", "a100", "cpu"), ``inner`` ("inductor" or
    "eager"), ``report`` (a path for the report); the full list is ``memfit.config.Options``.
    """
    return MemfitBackend(make_options(options, **kwargs))


#: Options -> the backend ``backend="memfit"`` shares between graphs compiled with those options (so that
#: its records and the ``report=`` file cover every graph of a model).
_shared: dict[Options, MemfitBackend] = {}


def registered_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable:
    """Entry point behind ``torch.compile(model, backend="memfit", options={...})``.

    Dynamo calls it once per graph; graphs compiled with equal options share one backend so that
    its records (and the ``report=`` file) cover all of them.
    """
    try:
        opts = make_options(kwargs.pop("options", None), **kwargs)
    except ValueError as e:
        raise OptionsError(str(e), first_useful_frame=None) from None
    be = _shared.setdefault(opts, MemfitBackend(opts))
    return be(gm, example_inputs)


def _check_options_at_torch_compile() -> None:
    """Make ``torch.compile(model, backend="memfit", options={...})`` refuse bad options itself.

    torch 2.13 hands a non-Inductor backend its ``options`` only at the first graph
    (``torch._TorchCompileWrapper`` stores them unchecked), so ``options={"budjet": ...}`` was refused
    at the first call, after Dynamo had traced the model. The wrapper's ``__init__`` is extended to
    validate memfit's options as it stores them. The very compile whose backend lookup imports this
    module is already inside the original ``__init__``; its options are read from that frame and
    checked here (raising makes that ``torch.compile`` call raise ``OptionsError``)."""
    cls = getattr(torch, "_TorchCompileWrapper", None)
    if cls is None or getattr(cls.__init__, "_memfit_checks_options", False):
        return
    original = cls.__init__

    def validate(name, options):
        if name == "memfit" and options:
            try:
                make_options(options)
            except ValueError as e:
                raise OptionsError(str(e), first_useful_frame=None) from None

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        validate(getattr(self, "compiler_name", None), getattr(self, "kwargs", {}).get("options"))
        unseen.install()  # torch._dynamo.reset() dropped it, if it ran since

    __init__._memfit_checks_options = True  # type: ignore[attr-defined]
    cls.__init__ = __init__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is original.__code__:
            validate(frame.f_locals.get("backend"), frame.f_locals.get("options"))
            break
        frame = frame.f_back


from memfit.compiler import unseen  # noqa: E402  (imports MemfitBackend from here lazily)

_check_options_at_torch_compile()
unseen.install()


__all__ = ["MemfitBackend", "make_backend", "registered_backend"]
