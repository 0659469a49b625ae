import pytest
import torch

import memfit
from memfit.config import format_bytes, make_options, parse_bytes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("6GiB", 6 * 2**30),
        ("6 GiB", 6 * 2**30),
        ("1.5gib", 3 * 2**29),
        ("512MB", 512 * 10**6),
        ("100", 100),
        ("2KiB", 2048),
        (4096, 4096),
        (1e9, 10**9),
        (None, None),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["6 GB of memory", "lots", "6XB", "-1GiB", "0", 0, -5, True, [1], float("nan")])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ValueError) as e:
        parse_bytes(bad)
    assert repr(bad) in str(e.value)


def test_format_bytes():
    assert format_bytes(3 * 2**30) == "3.00 GiB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(None) == "no limit"


def test_make_options_defaults_and_values():
    o = make_options()
    assert (o.budget, o.passes, o.device, o.inner, o.report) == (None, "auto", None, "inductor", None)
    o = make_options({"budget": "1GiB", "inner": "eager"}, device="h100", passes=[])
    assert (o.budget, o.inner, o.device, o.passes) == (2**30, "eager", "h100", ())
    assert hash(o) == hash(make_options(budget=2**30, inner="eager", device="h100", passes=()))


@pytest.mark.parametrize(
    "kwargs, names",
    [
        ({"bugdet": "1GiB"}, ["'bugdet'", "budget", "passes", "device", "inner", "report"]),
        ({"budget": "1 gigabyte"}, ["'1 gigabyte'", "GiB"]),
        ({"passes": ["checkpointing"]}, ["'checkpointing'", "accepted pass names"]),
        ({"passes": "auto,bogus"}, ["'bogus'"]),
        ({"device": "tpu"}, ["'tpu'", "h100", "a100", "cpu"]),
        ({"inner": "aot_eager"}, ["'aot_eager'", "inductor", "eager"]),
        ({"report": 3}, ["report=3"]),
    ],
)
def test_bad_options_name_value_and_accepted(kwargs, names):
    with pytest.raises(ValueError) as e:
        memfit.backend(**kwargs)
    for n in names:
        assert n in str(e.value)
    with pytest.raises(ValueError):  # same check through options={...}
        memfit.backend(options=kwargs)


def test_option_given_twice():
    with pytest.raises(ValueError, match="twice"):
        memfit.backend({"budget": 1}, budget=2)


def test_bad_option_through_registered_name_is_refused_at_torch_compile():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="six gigs"):
        torch.compile(model, backend="memfit", options={"budget": "six gigs"})
    torch.compile(model, backend="memfit", options={"budget": "6GiB"})  # a good one compiles lazily, as before


def test_bad_option_is_refused_by_the_torch_compile_that_first_loads_memfit():
    """The first ``torch.compile(..., backend="memfit")`` of a process imports memfit through Dynamo's
    entry points, from inside the call that should refuse: it does (not at the first graph)."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "try:\n"
        "    torch.compile(torch.nn.Linear(4, 4), backend='memfit', options={'budjet': 1})\n"
        "except ValueError as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.startswith("OptionsError unknown memfit option(s) ['budjet']"), (r.stdout, r.stderr)


@pytest.mark.parametrize("value,message", [
    ("1" * 400, "is too large: at most"),
    (10**30, "is too large"),
    (0.5, "less than one byte"),
    ("0.5B", "less than one byte"),
])
def test_sizes_out_of_range_are_refused_where_they_enter(value, message):
    with pytest.raises(ValueError, match=message):
        parse_bytes(value)
    with pytest.raises(ValueError, match=message):
        make_options(budget=value)
    assert parse_bytes("1.5") == 1 and parse_bytes(2**40) == 2**40


def test_a_report_that_cannot_be_written_is_refused_at_the_options(tmp_path):
    import memfit

    with pytest.raises(ValueError, match="is a folder"):
        make_options(report=str(tmp_path))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not a writable folder"):
        make_options(report=str(blocker / "sub" / "r.json"))
    assert make_options(report=str(tmp_path / "new" / "r.md")).report == str(tmp_path / "new" / "r.md")
    model = torch.nn.Linear(4, 4)
    with pytest.raises(memfit.OptionsError, match="is a folder"):  # through torch.compile: no compile first
        torch.compile(model, backend="memfit", options={"report": str(tmp_path)})(torch.randn(2, 4))



def test_import_memfit_is_light_and_every_public_name_resolves():
    """``import memfit`` loads no torch (the CLI checks its arguments first); names and subpackages
    (``memfit.hf``, ``memfit.planner``) load on first use, as the eager imports once gave them."""
    import subprocess
    import sys

    code = (
        "import sys, memfit\n"
        "assert 'torch' not in sys.modules\n"
        "missing = [n for n in memfit.__all__ if getattr(memfit, n, None) is None]\n"
        "assert not missing, missing\n"
        "assert callable(memfit.hf.compile) and memfit.planner.choice and memfit.backend.BudgetError\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "ok", r.stderr
