import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
sys.path.insert(0, EXAMPLES)

# The tests never read or write the user's cached CPU profile (~/.cache/memfit): they calibrate into a
# folder of their own (subprocesses inherit it), and a test that recalibrates replaces only that file.
if "MEMFIT_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["MEMFIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="memfit-test-cache-")
    atexit.register(shutil.rmtree, os.environ["MEMFIT_CACHE_DIR"], True)


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _plan_below_the_floor(request, monkeypatch):
    """Tests learn a graph's smallest reachable peak from a refused 1-byte budget
    (``BudgetError.smallest_peak``): for them the planner searches even below the step's floor. The
    tests of the fast refusal itself are marked ``floor_check`` and run as users do."""
    if request.node.get_closest_marker("floor_check") is None:
        from memfit.planner import choice

        monkeypatch.setattr(choice, "REFUSE_BELOW_FLOOR", False)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
