import pytest
import torch

from memfit.measurement import measure, to_loss


def test_cpu_peak_counts_exact_allocations():
    def step():
        a = torch.empty(1_000_000)  # 4 MB
        b = torch.empty(500_000)  # 2 MB, both live: 6 MB
        del a
        c = torch.empty(250_000)  # 1 MB, after 4 MB freed
        del b, c

    m = measure(step, repeat=2)
    assert 6_000_000 <= m.peak_bytes <= 6_000_000 + 4096
    assert m.time_s > 0 and len(m.times_s) == 2


def test_resident_memory_is_not_counted():
    keep = torch.empty(5_000_000)  # 20 MB allocated before the step

    def step():
        torch.empty(1_000_000).fill_(1)

    assert measure(step).peak_bytes < 4_100_000
    del keep


def test_measure_rejects_bad_counts():
    with pytest.raises(ValueError, match="repeat"):
        measure(lambda: None, repeat=0)


def test_to_loss():
    t = torch.tensor(2.0)
    assert to_loss(t) is t
    assert to_loss((t, torch.ones(3))) is t
    with pytest.raises(ValueError, match="loss_fn"):
        to_loss(torch.ones(3))


def test_paired_times_alternate_the_steps():
    """Each round runs one step of each configuration in turn (its ``before`` first, outside the
    timing), and the result is one median per step; bad counts are refused."""
    import time as _time

    from memfit.measurement import paired_times

    log = []

    def make(name, seconds):
        def step():
            log.append(name)
            _time.sleep(seconds)

        step.before = lambda: log.append(f"{name}.before")
        return step

    fast, slow = paired_times([make("a", 0.0), make("b", 0.02)], rounds=3)
    assert log == ["a.before", "a", "b.before", "b"] * 3
    assert slow >= 0.02 and fast >= 0.0  # sleep is a lower bound: no claim on a shared machine's speed
    with pytest.raises(ValueError, match="rounds=0 must be >= 1"):
        paired_times([make("a", 0.0)], rounds=0)
    with pytest.raises(ValueError, match="steps must not be empty"):
        paired_times([], rounds=1)


def test_training_step_of_a_compiled_function_resets_its_parameters_grads():
    """The form the docs advise for a model called with its loss: a compiled function, which has no
    ``zero_grad``. Each measured step starts with the parameters' gradients unset, so the peak counts
    the gradients allocated afresh, as for the module itself."""
    import memfit

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
    x = torch.randn(64, 256)

    @torch.compile(backend=memfit.backend(inner="eager", passes=[]))
    def loss_of(inp):
        return model(inp).pow(2).mean()

    as_function = measure(memfit.training_step(loss_of, (x,)), repeat=1)
    assert all(p.grad is not None for p in model.parameters())  # the step trained them

    def by_hand():
        loss_of(x).backward()

    by_hand.before = lambda: model.zero_grad(set_to_none=True)
    reference = measure(by_hand, repeat=1)
    grads = sum(p.numel() * 4 for p in model.parameters())
    assert as_function.peak_bytes >= grads  # gradients allocated afresh in every measured step
    assert abs(as_function.peak_bytes - reference.peak_bytes) <= 0.01 * reference.peak_bytes, (as_function, reference)


def test_measuring_writes_nothing_to_the_terminal(capfd):
    """kineto prints "USDT: ... profiler_start" / "profiler_stop" to file descriptor 2 on every profiler
    session (it leaked into ``memfit bench`` and the examples' output); measuring silences exactly those
    two calls."""
    import sys

    from memfit.measurement import measure

    print("before", file=sys.stderr, flush=True)
    measure(lambda: torch.randn(256, 256) @ torch.randn(256, 256), repeat=1)
    print("after", file=sys.stderr, flush=True)
    err = capfd.readouterr().err
    assert "USDT" not in err and "profiler_start" not in err
    assert "before" in err and "after" in err  # stderr itself is back
