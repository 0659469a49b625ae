"""The examples run as scripts (a few training steps through memfit) and their losses fall."""

import re
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.parametrize("script", ["examples/gpt.py", "examples/hf_llama.py"])
def test_example_trains(script):
    r = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    losses = [float(x) for x in re.findall(r"loss ([0-9.]+)", r.stdout)]
    assert len(losses) >= 3 and losses[-1] < losses[0], r.stdout
