"""Inductor's own buffer plan for a graph it compiled: what it allocates, hands over and frees, in order.

Why: the FX-level memory model cannot know what Inductor does to a graph after memfit hands it over,
and those decisions move the step's peak by tens of percent. Measured on a 2-layer GPT (CPU, 2 x 256
tokens, a checkpoint plan for 8.27 MiB): predicted 7.40 MiB, measured 11.60 MiB. The three causes,
all visible in Inductor's output code:

* ``add(mm(a, b), c)`` becomes ``addmm(c, a, b)`` at the ``add`` (torch/_inductor/fx_passes/post_grad.py):
  a tied embedding's gradient moves its 4 MiB [tokens, vocab] input to the end of the backward;
* a dead buffer is not freed when a later allocation of the same size and dtype can take it
  (``bufN = bufM; del bufM  # reuse``; ``FreeIfNotReusedLine`` in torch/_inductor/codegen/wrapper.py), so
  it stays allocated until then;
* a pointwise kernel writes over an input that dies in it (in place), and fusion decides which
  kernels read what, and in which order.

So after Inductor has planned a graph's buffers, memfit reads that plan (the wrapper's memory-planning
lines, after ``memory_plan_reuse``) and replays it: every allocation with its size, every hand-over,
every free, the graph's inputs freed by ``del`` and what it returns. The memory model then composes
the step from these plans instead of its own guess (``memory.simulate(..., buffer_plans=...)``), and the
backend re-plans a graph whose compiled plan is over the budget. Memory an extern kernel allocates and
frees inside itself is added where the op models know it (``memfit.planner.scratch``: CPU convolutions,
half-precision matmuls; ``memfit.kernels.stream``: a stream op's chunk graphs); other fallback kernels'
scratch is not seen (the CPU attention backward's 0.12 MiB here).

This reads Inductor internals of torch 2.13 (pinned); if they change, :func:`capture` records nothing
and the memory model falls back to its own estimate, saying so in the notes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

ALLOC = "alloc"
FREE = "free"


@dataclass(frozen=True)
class BufferPlan:
    """The replayed plan of one compiled graph.

    ``events``: ``(ALLOC, key, nbytes)`` or ``(FREE, key, 0)`` in execution order, where ``key`` is an
    int for a buffer Inductor allocates and the input's name (a ``str``) for a graph input whose last
    reference the graph drops (``del primals_3``, or a donated input handed over to an output).
    ``outputs``: per graph output, the key of the storage it returns (``None``: not a tensor, or unknown).
    Whatever is neither freed nor returned dies when the graph returns.
    """

    events: tuple[tuple[str, Any, int], ...]
    outputs: tuple[Any, ...]
    inputs: tuple[str, ...]


def _size(node) -> int:
    from torch._inductor.utils import get_dtype_size
    from torch._inductor.virtualized import V
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    from memfit.planner.shapes import size_bound

    try:
        size = V.graph.sizevars.simplify(V.graph.get_allocation_storage_size(node))
        if free_unbacked_symbols(size):  # data-dependent: the bound memfit's own model uses (Inductor's
            n = size_bound(size, shape_env=V.graph.sizevars.shape_env)  # fallback 0 hid these buffers)
        else:
            n = V.graph.sizevars.optimization_hint(size, fallback=0)
        return int(n) * get_dtype_size(node.get_dtype())
    except Exception:  # noqa: BLE001 - a buffer without a static size: counted as 0, the model's estimate stays
        return 0


def _name(node) -> str | None:
    try:
        return node.get_name()
    except Exception:  # noqa: BLE001 - None outputs, constants
        return None


class _References:
    """The storages the replayed code's names refer to, counted: a storage is freed (a ``FREE`` event)
    when the last name referring to it is dropped, as Python's reference counting frees it."""

    def __init__(self) -> None:
        self.events: list = []
        self.ref: dict[str, Any] = {}
        self.count: dict[Any, int] = {}
        self.held: dict[str, list] = {}  # tuple name -> keys of the outputs it holds
        self._next_id = iter(range(1 << 30))

    def bind(self, name: str, key: Any) -> None:
        if name is None or key is None:
            return
        if name in self.ref:
            self.unbind(name)
        self.ref[name] = key
        self.count[key] = self.count.get(key, 0) + 1

    def unbind(self, name: str) -> None:
        key = self.ref.pop(name, None)
        if key is None:
            return
        self._drop(key)

    def alloc(self, name: str, nbytes: int) -> None:
        key = next(self._next_id)
        self.events.append((ALLOC, key, nbytes))
        self.bind(name, key)

    def hold(self, name: str, child: str) -> None:
        """The tuple ``name`` also refers to the storage of its output ``child``."""
        key = self.ref[child]
        self.count[key] += 1
        self.held.setdefault(name, []).append(key)

    def release(self, name: str) -> None:
        """Drop the references the tuple ``name`` holds to its outputs."""
        for key in self.held.pop(name, ()):
            self._drop(key)

    def _drop(self, key: Any) -> None:
        self.count[key] -= 1
        if self.count[key] == 0:
            self.events.append((FREE, key, 0))


def _buffer_size(name: str) -> int:
    """The size of the buffer Inductor's graph calls ``name`` (0: unknown)."""
    from torch._inductor.virtualized import V

    try:
        buf = V.graph.get_buffer(name)
    except Exception:  # noqa: BLE001
        buf = None
    return _size(buf) if buf is not None else 0


def _extern_scratch(node) -> int:
    """Bytes an extern kernel allocates inside itself (a CPU convolution's operand copies): the op
    models' scratch of the FX node it was lowered from (``origins``); 0 where none has one. Without
    it a small ResNet's replay was 4.8% under its measured peak (5.80 against 6.09 MiB)."""
    from memfit.kernels import op_models

    models = op_models()
    kernel = getattr(node, "op_overload", None)
    name = str(getattr(node, "python_kernel_name", "") or "")
    best = 0
    for origin in getattr(node, "origins", ()) or ():
        target = getattr(origin, "target", None)
        model = models.get(target)
        # the kernel's own op only: a fused extern kernel's origins include the pointwise ops around it
        # (a batch norm backward Inductor computes in its own kernels has no scratch there)
        # (an extern kernel writing into a buffer calls the op's ``out`` overload: ``aten.mm.out`` for ``mm``)
        ours = (getattr(target, "overloadpacket", target) == getattr(kernel, "overloadpacket", kernel) if kernel is not None
                else name.endswith("." + getattr(target, "__name__", "?").split(".")[0]))
        if ours and model is not None and model.scratch is not None:
            try:
                best = max(best, int(model.scratch(origin, strides=_input_strides(node))))
            except Exception:  # noqa: BLE001 - no values on the node: nothing to add
                pass
    return best


def _replay_scratch(refs: "_References", node) -> None:
    """An extern kernel's scratch (:func:`_extern_scratch`): allocated and freed inside the kernel, with
    its outputs live."""
    scratch = _extern_scratch(node)
    if scratch:
        name = f"{_name(node)} scratch"
        refs.alloc(name, scratch)
        refs.unbind(name)


def _input_strides(node) -> list | None:
    """The strides of an extern kernel's tensor inputs as Inductor laid them out (hinted ints)."""
    from torch._inductor.virtualized import V

    try:
        return [tuple(int(x) for x in V.graph.sizevars.optimization_hints(inp.get_stride())) for inp in node.inputs]
    except Exception:  # noqa: BLE001 - an input without a layout: the FX values' strides stand
        return None


def replay(wrapper) -> BufferPlan:
    """Replay the planned lines of ``wrapper`` (a ``PythonWrapperCodegen`` after ``memory_plan_reuse``)."""
    from torch._inductor.codegen import wrapper as w
    from torch._inductor.virtualized import V

    refs = _References()
    # A fallback kernel with several outputs returns them in a tuple (``buf40``) that the outputs are
    # then taken from (``buf41 = buf40[0]``): all are allocated when the kernel runs, and each lives
    # until both its own name and the tuple's are dropped.
    children: dict[str, list[str]] = {}
    for line in wrapper.lines:
        if isinstance(line, w.MultiOutputLine):
            children.setdefault(line.arg_name, []).append(line.result_name)
    inputs = tuple(V.graph.graph_inputs)
    for name in inputs:
        refs.bind(name, name)
    for line in wrapper.lines:
        _replay_line(refs, line, children)
    outputs = []
    for o in V.graph.graph_outputs:
        name = _name(o)
        outputs.append(refs.ref.get(name) if name is not None else None)
    return BufferPlan(tuple(refs.events), tuple(outputs), inputs)


def _replay_line(refs: _References, line, children: dict[str, list[str]]) -> None:
    """What one memory-planning line of the wrapper allocates, hands over or frees (other lines: nothing)."""
    from torch._inductor import ir
    from torch._inductor.codegen import wrapper as w

    if isinstance(line, w.AllocateLine):
        name = _name(line.node)
        layout = getattr(line.node, "layout", None)
        if isinstance(layout, ir.NonOwningLayout):
            refs.bind(name, refs.ref.get(_name(layout.view.data)))
        else:
            refs.alloc(name, _size(line.node))
    elif isinstance(line, w.ReuseLine):
        old, new = _name(line.node), _name(line.reused_as)
        refs.bind(new, refs.ref.get(old))
        if line.delete_old:
            refs.unbind(old)
    elif isinstance(line, w.ReinterpretLine):
        refs.bind(_name(line.reused_as), refs.ref.get(_name(line.node)))
    elif isinstance(line, w.FreeIfNotReusedLine):
        if not line.is_reused:
            refs.unbind(_name(line.node))
            refs.release(_name(line.node))
    elif isinstance(line, w.FreeLine):
        refs.unbind(_name(line.node))
    elif isinstance(line, w.ExternKernelAllocLine):
        name = _name(line.node)
        if not isinstance(getattr(line.node, "layout", None), ir.MultiOutputLayout):
            refs.alloc(name, _size(line.node))
        else:
            for child in children.get(name, ()):
                refs.alloc(child, _buffer_size(child))
                refs.hold(name, child)
        _replay_scratch(refs, line.node)
    elif isinstance(line, w.ExternKernelOutLine):
        # an extern kernel writing into a buffer allocated above (mm, addmm, bmm): a bf16 or fp16 one on
        # the CPU works in packed copies of its operands (an LM head's weight gradient, [4096, 512] x
        # [512, 64] with the first transposed: 0.78 MiB besides its output). Not counted, a bf16-autocast
        # Llama replayed at 7.48 MiB and measured 8.26, over a 7.49 MiB budget.
        _replay_scratch(refs, line.node)
    elif isinstance(line, w.MultiOutputLine):
        if line.result_name not in refs.ref:  # not allocated with its kernel above
            refs.alloc(line.result_name, _buffer_size(line.result_name))


@contextlib.contextmanager
def capture(sink: list):
    """While active, every graph Inductor generates code for appends its :class:`BufferPlan` to ``sink``
    (or the exception that stopped the replay, so that the caller can say why it has no plan)."""
    try:
        from torch._inductor.codegen.wrapper import PythonWrapperCodegen
    except ImportError as e:  # pragma: no cover - torch is pinned
        sink.append(e)
        yield sink
        return
    original = PythonWrapperCodegen.memory_plan_reuse

    def planned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        try:
            sink.append(replay(self))
        except Exception as e:  # noqa: BLE001 - never break a compile over the replay
            sink.append(e)
        return out

    PythonWrapperCodegen.memory_plan_reuse = planned
    try:
        yield sink
    finally:
        PythonWrapperCodegen.memory_plan_reuse = original
