"""The memory model: exact bytes on graphs small enough to work out by hand, and predicted vs
measured peaks on the three reference models (eager inner compiler, so every graph value is a
real allocation)."""

import pytest
import torch

import memfit
from memfit.measurement import measure, training_step
from memfit.planner.memory import GRAD, OUTPUT, SAVED, TANGENT


class ReluSum(torch.nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(d, h))

    def forward(self, x):
        return (x @ self.w).relu().sum()


def _compile_step(model, *args, **opts):
    be = memfit.backend(inner="eager", **opts)
    compiled = torch.compile(model, backend=be)
    step = training_step(compiled, args)
    return be, step


def test_exact_bytes_hand_computed():
    N, D, H = 64, 16, 32
    model = ReluSum(D, H)
    x = torch.randn(N, D)
    be, step = _compile_step(model, x)
    step()
    m = be.records[0].analysis.memory
    # saved: relu's output only (threshold_backward reads it); x and w are resident
    assert m.saved_bytes == N * H * 4
    (saved,) = m.saved
    assert saved.producer == "relu" and saved.kind == SAVED
    # forward peak: mm and relu both live at relu (8NH); backward: relu, its grad, loss, tangent
    assert m.peak_bytes == 2 * N * H * 4 + 4 + 4
    kinds = {b.kind for b in m.buffers if b.nbytes}
    assert {SAVED, OUTPUT, TANGENT, GRAD} <= kinds
    grads = [b for b in m.buffers if b.kind == GRAD]
    assert sum(b.nbytes for b in grads) == D * H * 4
    # the timeline has a point per node of both graphs, and ends with only the loss and the grad live
    nodes = len(be.records[0].pair.forward.graph.nodes) + len(be.records[0].pair.backward.graph.nodes)
    assert len(m.timeline) == nodes
    assert m.timeline[-1].after_free == D * H * 4 + 4
    # measured agrees to the byte, up to allocator noise below 1 KiB
    meas = measure(step, repeat=1)
    assert abs(meas.peak_bytes - m.peak_bytes) < 1024, (meas.peak_bytes, m.peak_bytes)


def test_views_add_no_bytes_and_keep_their_base_alive():
    class ViewSaved(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(32, 32))

        def forward(self, x):
            y = torch.sin(x @ self.w)  # [64, 32]
            z = y.view(2, 32, 32).transpose(1, 2)  # views of y
            return torch.cos(z).sum()  # cos backward saves z: a view, so y's buffer stays

    model = ViewSaved()
    be, step = _compile_step(model, torch.randn(64, 32))
    step()
    m = be.records[0].analysis.memory
    view_nodes = [n for n in be.records[0].pair.forward.graph.nodes if n.target in (torch.ops.aten.view.default, torch.ops.aten.transpose.int)]
    assert view_nodes, "expected views in the forward graph"
    producers = {b.producer for b in m.buffers if b.nbytes}
    assert not producers & {n.name for n in view_nodes}  # a view allocates nothing
    saved = {b.producer: b for b in m.saved}
    assert "sin" in saved and saved["sin"].nbytes == 64 * 32 * 4
    meas = measure(step, repeat=1)
    assert abs(meas.peak_bytes - m.peak_bytes) <= 0.02 * m.peak_bytes


def test_source_and_module_of_saved_values():
    import gpt

    model, inputs = gpt.small()
    be, step = _compile_step(model, *inputs)
    step()
    m = be.records[0].analysis.memory
    gelu = [b for b in m.saved if b.producer.startswith("gelu")]
    assert gelu, [b.producer for b in m.saved]
    assert gelu[0].module == "h.0.mlp.gelu"
    assert gelu[0].source.split(" ")[0].endswith("gpt.py:57")
    dom = m.dominant_saved(3)
    assert dom and all(b.kind == SAVED for b in dom) and dom[0].nbytes == max(b.nbytes for b in m.saved)


def _reference_model(name):
    import gpt
    import hf_llama
    import mlp

    if name == "mlp":
        model, inputs = mlp.factory(batch=512, width=256, depth=4)
        return model, tuple(inputs), {}
    if name == "gpt":
        model, inputs = gpt.factory(batch=2, seq=256, n_layer=2)
        return model, tuple(inputs), {}
    model, inputs = hf_llama.factory(batch=2, seq=256)
    return model, (), inputs


@pytest.mark.parametrize("inner", ["eager", "inductor"])
@pytest.mark.parametrize("name", ["mlp", "gpt", "llama"])
def test_predicted_peak_within_10_percent_of_measured(name, inner):
    """Eager inner: every graph value is an allocation, so the model is exact (ratio 1.000 here).
    Inductor: the step is replayed from Inductor's buffer plans (1.000 here; the FX-level estimate,
    which drops values fused into a consumer's kernel, was 0.95-1.00)."""
    model, args, kwargs = _reference_model(name)
    be = memfit.backend(inner=inner)
    compiled = torch.compile(model, backend=be)
    meas = measure(training_step(compiled, args, kwargs), repeat=1)
    predicted = be.step_analysis().memory.peak_bytes
    assert len(be.records) == 1
    ratio = meas.peak_bytes / predicted
    print(f"{name}/{inner}: predicted {predicted} measured {meas.peak_bytes} ratio {ratio:.3f}")
    assert 0.9 <= ratio <= 1.1, f"{name}: measured {meas.peak_bytes} vs predicted {predicted} ({ratio:.3f})"


@pytest.mark.parametrize("inner", ["eager", "inductor"])
@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_standalone_analysis_agrees_with_backend_graphs(name, inner):
    """The fake-tensor path sees the same step as the backend on real tensors."""
    import gpt
    import hf_llama

    factory = {"gpt": gpt.small, "llama": hf_llama.small}[name]
    fake = memfit.analyze(factory, inner=inner)
    model, inputs = factory()
    args, kwargs = ((), inputs) if isinstance(inputs, dict) else (inputs, {})
    be = memfit.backend(inner=inner)
    training_step(torch.compile(model, backend=be), args, kwargs)()
    real = be.step_analysis(replayed=False)  # the backend's graphs, estimated as the fake path does
    assert fake.memory.peak_bytes == real.memory.peak_bytes
    assert all(bool(r.buffer_plans) == (inner == "inductor") for r in be.records)
    assert fake.memory.saved_bytes == real.memory.saved_bytes
    assert fake.flops == real.flops
    assert fake.param_bytes == sum(p.numel() * 4 for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("inner", ["eager", "inductor"])
@pytest.mark.parametrize("name", ["mlp", "gpt", "llama"])
def test_predicted_peak_within_10_percent_of_measured_cuda(name, inner):
    """On CUDA the caching allocator rounds blocks to 512 bytes (the h100/a100 profiles model it)."""
    model, args, kwargs = _reference_model(name)
    model = model.cuda()
    args = tuple(a.cuda() for a in args)
    kwargs = {k: v.cuda() for k, v in kwargs.items()}
    be = memfit.backend(inner=inner)
    compiled = torch.compile(model, backend=be)
    meas = measure(training_step(compiled, args, kwargs), device="cuda", repeat=1)
    predicted = be.step_analysis().memory.peak_bytes
    ratio = meas.peak_bytes / predicted
    print(f"cuda {name}/{inner}: predicted {predicted} measured {meas.peak_bytes} ratio {ratio:.3f}")
    assert 0.9 <= ratio <= 1.1


class _Broken(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(64, 256)
        self.b = torch.nn.Linear(256, 64)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.a(x))
        torch._dynamo.graph_break()
        return self.b(h).pow(2).mean(), h  # the caller holds h, as an HF output object holds logits


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_graph_break_step_composes_graphs(inner):
    """Two graphs: h passes from the first to the second; the second's gradient for h is the first's
    incoming gradient. h is counted live to the end of the step (the caller may hold what a graph
    returns, and here does), the gradient once and freed when used up: the model matches measurement."""
    model = _Broken()
    be = memfit.backend(inner=inner)
    meas = measure(training_step(torch.compile(model, backend=be), (torch.randn(128, 64),)), repeat=1)
    analysis = be.step_analysis()
    assert len(be.records) == 2 and analysis.num_graphs == 2 and "graph breaks" in analysis.notes[0]
    assert all(r.pair.param_inputs is not None for r in be.records)
    ratio = meas.peak_bytes / analysis.memory.peak_bytes
    assert 0.97 <= ratio <= 1.03, (meas.peak_bytes, analysis.memory.peak_bytes)


def test_recompile_replaces_earlier_version_of_the_same_graph():
    be = memfit.backend(inner="eager")
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    compiled = torch.compile(model, backend=be, dynamic=False)
    for n in (16, 48):
        compiled(torch.randn(n, 64)).sum().backward()
    assert len(be.records) == 2 and be.records[0].frame == be.records[1].frame
    step = be.step_analysis()
    assert step.num_graphs == 1 and step.memory.peak_bytes == be.records[1].analysis.memory.peak_bytes
    assert be.records[1].analysis.memory.peak_bytes > be.records[0].analysis.memory.peak_bytes


class _ConvNet(torch.nn.Module):
    """A 3-channel stem, a 3x3 conv-BN-ReLU pair, a stride-2 block with a 1x1 shortcut, a head."""

    def __init__(self):
        super().__init__()
        bn = torch.nn.BatchNorm2d
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 1, 1), bn(16), torch.nn.ReLU())
        self.body = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, 1, 1, bias=False), bn(16), torch.nn.ReLU())
        self.down = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, 2, 1, bias=False), bn(32))
        self.short = torch.nn.Conv2d(16, 32, 1, 2, bias=False)
        self.fc = torch.nn.Linear(32, 10)

    def forward(self, x, y):
        h = self.body(self.stem(x))
        h = torch.relu(self.down(h) + self.short(h))
        return torch.nn.functional.cross_entropy(self.fc(h.mean((2, 3))), y)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_cpu_convolution_and_batch_norm_scratch_is_counted(inner):
    """A CPU convolution copies its operands into oneDNN's layout, and batch norm's backward allocates
    a tensor of its input's size, all freed before they return: measured per shape and counted at
    the op (``memfit/planner/scratch.py``). Without it a small ResNet was predicted 12.5% under its
    measured peak (5.48 against 6.26 MiB); with it, to 4 bytes. Under Inductor the scratch is added to
    the replayed buffer plan at each extern kernel (the same ResNet: 5.80 MiB, now 6.09 as measured)."""
    from memfit.planner.memory import TEMP

    torch.manual_seed(0)
    model, args = _ConvNet(), (torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    be = memfit.backend(inner=inner)
    compiled = torch.compile(model, backend=be)
    measured = measure(training_step(compiled, args, {}), repeat=1).peak_bytes
    (rec,) = be.records
    if inner == "eager":
        temps = {b.producer.rstrip("_0123456789") for b in rec.analysis.memory.buffers if b.kind == TEMP and b.nbytes}
        assert {"convolution", "convolution_backward", "native_batch_norm_backward"} <= temps, temps
    else:
        from memfit.planner.inductor_plan import ALLOC, FREE

        # scratch: allocated and freed at once, at the extern kernel (convolutions, both ways)
        freed_at_once = [
            a for plan in rec.buffer_plans.values() for a, b in zip(plan.events, plan.events[1:])
            if a[0] == ALLOC and b[0] == FREE and a[1] == b[1] and a[2]
        ]
        assert len(freed_at_once) >= 4, freed_at_once
    assert abs(rec.peak_bytes - measured) <= 0.02 * measured, (rec.peak_bytes, measured)
