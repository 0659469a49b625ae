import pytest
import torch

from memfit.measure import measure, to_loss


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
