"""The package's shape: one flat public surface, the technique registry, refusals as data, and compile
attempts that leave nothing behind but the one the backend keeps.

Numerics are not at stake here (the other test files hold them); structure is: every name the docs
spell resolves, no public name shadows a module, every note carries its technique and reason code,
and a search's discarded attempts leave no record, no verdict and no report write.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import os
import re

import pytest
import torch

import memfit
from memfit import techniques
from memfit.errors import REASONS, CantApply, Note, is_note

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + [os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs"))) if f.endswith(".md")]
FILE_SUFFIXES = {"json", "md", "html", "htm", "py", "txt", "png"}  # "memfit.json" is a file name, not an API


def _resolve(dotted: str):
    """Import the longest module prefix of ``dotted``, then read the rest as attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        mod = ".".join(parts[:i])
        try:
            obj = importlib.import_module(mod)
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_every_name_the_docs_use_resolves():
    names = set()
    for path in DOCS:
        text = open(os.path.join(ROOT, path)).read()
        for m in re.finditer(r"(?<![\w/.-])memfit(?:\.[A-Za-z_]\w*)+", text):
            if m.group(0).rsplit(".", 1)[-1] not in FILE_SUFFIXES:
                names.add(m.group(0))
        for m in re.finditer(r"from (memfit(?:\.\w+)*) import ([\w, ]+)", text):
            names.update(f"{m.group(1)}.{n.strip()}" for n in m.group(2).split(",") if n.strip())
    assert {"memfit.BudgetError", "memfit.backend", "memfit.measure", "memfit.training_step"} <= names, sorted(names)
    missing = []
    for name in sorted(names):
        try:
            _resolve(name)
        except (AttributeError, ModuleNotFoundError) as e:
            missing.append(f"{name}: {e}")
    assert not missing, missing


def test_the_layout_page_lists_every_module_and_nothing_else():
    """docs/layout.md's module list is the picture a newcomer holds: each listed file exists, and every
    module of the package is listed (a new module must be placed in it)."""
    text = open(os.path.join(ROOT, "docs", "layout.md")).read()
    block = text.split("## Modules", 1)[1].split("```")[1]
    listed, folder = set(), None
    for line in block.splitlines():
        top = re.match(r"^(memfit/[\w/.]*)", line)
        sub = re.match(r"^  (\w+\.py) ", line)
        if top:
            folder = top.group(1) if top.group(1).endswith("/") else None
            listed.update([] if folder else [top.group(1)])
        elif sub and folder:
            listed.add(folder + sub.group(1))
    actual = {os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(os.path.join(ROOT, "memfit"))
              for f in fs if f.endswith(".py") and f not in ("__init__.py", "__main__.py")}
    actual.add("memfit/__init__.py")
    assert not [p for p in listed if not os.path.exists(os.path.join(ROOT, p))], sorted(listed)
    assert not sorted(actual - listed), f"modules missing from docs/layout.md: {sorted(actual - listed)}"


def test_public_surface_is_flat_and_shadows_no_module():
    for name in memfit.__all__:
        assert hasattr(memfit, name), name
        assert importlib.util.find_spec(f"memfit.{name}") is None, f"memfit.{name} is both a module and a public name"
    assert memfit.BudgetError is memfit.backend.BudgetError  # the old spelling, kept
    assert memfit.OptionsError is memfit.backend.OptionsError
    import memfit.measurement as m

    assert m.measure is memfit.measure and m.training_step is memfit.training_step
    assert issubclass(memfit.OptionsError, ValueError)


def test_budget_and_option_errors_are_caught_by_their_flat_names():
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    x = torch.randn(8, 16)
    with pytest.raises(memfit.BudgetError) as e:
        torch.compile(copy.deepcopy(model), backend=memfit.backend(budget=1, inner="eager"))(x).sum().backward()
    assert e.value.budget == 1 and e.value.smallest_peak > 1
    torch._dynamo.reset()
    with pytest.raises(memfit.OptionsError, match="budget='lots' is not a size"):
        torch.compile(copy.deepcopy(model), backend="memfit", options={"budget": "lots"})(x)


def test_the_registry_is_where_the_passes_are_worked_out():
    assert set(techniques.PASSES) == {"checkpoint", "share_norms", "fewbit", "split_backward", "stream"}
    assert techniques.APPROXIMATE == {"fewbit"}
    assert techniques.enabled("auto") == ("checkpoint", "share_norms")
    assert techniques.enabled("auto", allow_approximation=True) == ("checkpoint", "share_norms", "fewbit")
    assert techniques.enabled(("stream", "checkpoint")) == ("stream", "checkpoint")
    assert techniques.stage_passes("auto") == ["checkpoint", "share_norms"]
    assert memfit.backend(passes="auto").passes == ("checkpoint", "share_norms")
    from memfit.pipelining import stage_options

    assert stage_options().passes == ("checkpoint", "share_norms", "split_backward")
    with pytest.raises(ValueError, match="accepted pass names: checkpoint, fewbit, share_norms, split_backward, stream"):
        memfit.backend(passes=["nope"])


def test_notes_carry_technique_and_code_and_stay_text():
    n = Note("checkpoint: not applied: x", "checkpoint", "not_applied")
    assert n == "checkpoint: not applied: x" and n.startswith("checkpoint") and json.loads(json.dumps([n])) == [n]
    assert is_note(n, "not_applied", "checkpoint") and not is_note(n, "not_applied", "fewbit")
    assert copy.deepcopy(n).code == "not_applied"
    assert CantApply("dynamic", "dynamic_shapes").note("stream").code == "dynamic_shapes"
    with pytest.raises(ValueError, match="unknown note reason code"):
        Note("x", None, "made_up")
    assert set(REASONS) >= {"not_applied", "kept_smallest", "over_budget"}


def test_a_search_commits_only_the_attempt_it_keeps(tmp_path, monkeypatch):
    """``passes="auto"`` under a budget only streaming meets: the search compiles without streaming
    (refused), probes chunk counts and compiles streamed; the backend holds one record (the streamed
    graph), no verdict, and the report was written once, by the commit."""
    import gpt

    from memfit.compiler.backend import MemfitBackend

    model, (idx, tgt) = gpt.factory(batch=1, seq=256, block_size=256, vocab_size=4096, n_layer=1, n_head=2, n_embd=32)
    with pytest.raises(memfit.BudgetError) as e:
        torch.compile(copy.deepcopy(model), backend=memfit.backend(passes=["checkpoint"], budget=1, inner="eager"))(idx, tgt)
    torch._dynamo.reset()
    writes = []
    real_write = MemfitBackend._write_report
    monkeypatch.setattr(MemfitBackend, "_write_report", lambda self: (writes.append(len(self.records)), real_write(self)))
    report = tmp_path / "r.json"
    be = memfit.backend(budget=int(e.value.smallest_peak * 0.8), inner="eager", report=str(report))
    from memfit.kernels.stream import REGISTRY

    regions_before = set(REGISTRY)
    torch.compile(model, backend=be)(idx, tgt).backward()
    (rec,) = be.records
    stream_keys = {n.args[0] for n in rec.pair.forward.graph.nodes if n.target is torch.ops.memfit.stream.default}
    assert stream_keys and set(REGISTRY) - regions_before == stream_keys  # the dropped tries' regions are released
    assert rec.partition.startswith("stream + ") and not be.infeasible
    assert writes == [1], writes
    assert [g["name"] for g in json.loads(report.read_text())["graphs"]] == [rec.name]
    assert all(isinstance(n, Note) for n in rec.notes), [n for n in rec.notes if not isinstance(n, Note)]
    assert any(is_note(n, "retry", "auto") for n in rec.notes), rec.notes
    assert rec.peak_bytes <= be.options.budget
