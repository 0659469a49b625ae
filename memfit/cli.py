"""``memfit`` command line.

    memfit analyze examples/gpt.py [--json out.json] [--device h100] [--inner eager]

    memfit analyze --budget 2GiB examples/gpt.py   # plan activation checkpointing to fit 2 GiB
    memfit analyze --passes fewbit --fewbit-bits 2 examples/gpt.py   # few-bit activation gradients

    memfit plan examples/hf_llama.py:llama3_8b --device-memory 80GB --device h100 --report plan.html
    memfit bench examples/gpt.py --budget 120MiB --report bench.html   # predicted vs measured, real run

Exit codes: 0 done; 2 bad input (missing file, no factory, the factory or the trace fails), with a
one-line reason on stderr and no traceback unless ``--debug``; 3 no plan fits the budget (the
message states the smallest peak memfit can reach, and ``plan``/``bench`` exit 3 when the report's
verdict is that the step does not fit).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

from memfit.units import format_bytes

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_DOES_NOT_FIT = 3


def _parser() -> argparse.ArgumentParser:
    from memfit import __version__

    p = argparse.ArgumentParser(prog="memfit", description="Make a PyTorch training step fit a memory budget.")
    p.add_argument("--version", action="version", version=f"memfit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _add_analyze(sub)
    for name, help_, desc in (
        (
            "plan",
            "plan the step for a budget on fake tensors and write a report",
            "Trace one training step of TARGET's model on fake tensors (any model size, no real memory), let the "
            "planner choose what to save, recompute or code (passes=auto) so the step fits the budget at the least "
            "predicted time, and write the report (HTML, Markdown and JSON).",
        ),
        (
            "bench",
            "run the step for real, unplanned and planned, and report predicted vs measured",
            "Build TARGET's model with real tensors, measure a training step compiled plainly (torch.compile) and by "
            "memfit for the budget, side by side (allocator peak and wall time), and write the report with both.",
        ),
    ):
        _add_plan_or_bench(sub, name, help_, desc)
    return p


def _add_analyze(sub) -> None:
    from memfit.config import DEVICE_PROFILES
    from memfit.techniques import PASSES

    a = sub.add_parser(
        "analyze",
        help="the memory model of one training step, on fake tensors",
        description="Trace one training step of TARGET's model on fake tensors (no real memory) and print "
        "parameter bytes, saved-activation bytes, the predicted step peak, FLOPs and the largest saved values.",
    )
    a.add_argument("target", help="path/to/file.py or package.module, optionally :factory (default: factory)")
    a.add_argument("--json", metavar="PATH", help="also write the analysis as JSON to PATH")
    a.add_argument("--device", choices=DEVICE_PROFILES, default=None, help="device profile for time estimates (default: cpu)")
    a.add_argument(
        "--inner",
        choices=("inductor", "eager"),
        default="inductor",
        help="analyse the graphs as this inner compiler gets them (default: inductor)",
    )
    a.add_argument(
        "--budget",
        metavar="SIZE",
        help="peak the step may use above resident memory (e.g. 2GiB); plans activation checkpointing to fit",
    )
    a.add_argument(
        "--passes",
        default="auto",
        metavar="LIST",
        help=f"comma-separated passes ({', '.join(PASSES)}) or 'auto' (exact passes that change nothing "
        "about when gradients arrive; default)",
    )
    a.add_argument(
        "--fewbit-bits",
        type=int,
        default=2,
        metavar="N",
        help="bits per element of few-bit activation codes, 1-4 (with --passes fewbit; default: 2)",
    )
    a.add_argument(
        "--fewbit-tables",
        default="optimal",
        choices=("optimal", "approx_bp"),
        help="few-bit derivative tables: optimal (default) or approx_bp (Approx-BP's ReGELU2/ReSiLU2, 2 bits)",
    )
    a.add_argument("--top", type=int, default=10, metavar="N", help="how many saved values to list (default: 10)")
    a.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_plan_or_bench(sub, name: str, help_: str, desc: str) -> None:
    from memfit.config import DEVICE_PROFILES

    q = sub.add_parser(name, help=help_, description=desc)
    q.add_argument("target", help="path/to/file.py or package.module, optionally :factory (default: factory)")
    size = q.add_mutually_exclusive_group(required=True)
    size.add_argument("--budget", metavar="SIZE", help="peak the step may use above resident memory (e.g. 20GiB)")
    size.add_argument(
        "--device-memory",
        metavar="SIZE",
        help="the whole device (e.g. 80GB); memfit subtracts parameters and optimizer state",
    )
    q.add_argument(
        "--optimizer",
        default="adamw",
        help="optimizer whose state is resident, with --device-memory: adamw, adam, sgd, momentum, ... or none "
        "(default: adamw)",
    )
    q.add_argument("--device", choices=DEVICE_PROFILES, default=None, help="device profile for time estimates")
    q.add_argument("--inner", choices=("inductor", "eager"), default="inductor", help="inner compiler (default: inductor)")
    q.add_argument("--passes", default="auto", metavar="LIST", help="'auto' (default) or comma-separated pass names")
    q.add_argument(
        "--allow-approximation",
        action="store_true",
        help="let the planner use few-bit activation gradients (approximate) where they help",
    )
    q.add_argument("--report", metavar="PATH", default=None, help="write the report here: .html, .md or .json, the "
                   "other two forms beside it (default: none written; the verdict is printed)")
    q.add_argument("--title", default=None, help="title of the report (default: the target)")
    if name == "bench":
        q.add_argument("--repeat", type=int, default=3, metavar="N", help="timed steps per configuration (default: 3)")
    else:
        q.add_argument("--pipeline-stages", type=int, default=None, metavar="N",
                       help="plan a pipeline of N equal stages instead: the target's batch is one microbatch, "
                       "--budget is per stage; chooses the schedule and each stage's checkpoint plan")
        q.add_argument("--microbatches", type=int, default=None, metavar="M",
                       help="microbatches per pipeline step (default: 2 x stages)")
        q.add_argument("--comm-ms", type=float, default=0.0, metavar="MS",
                       help="milliseconds per activation/gradient hop between ranks (default: 0)")
    q.add_argument("--debug", action="store_true", help="show tracebacks")


class _Progress:
    """One status line on stderr: redrawn in place on a terminal, one line per update otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()
        self.width = 0

    def __call__(self, msg: str) -> None:
        line = f"memfit [{time.perf_counter() - self.t0:6.1f} s] {msg}"
        if self.tty:
            pad = max(0, self.width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self.width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty and self.width:
            self.stream.write("\n")
            self.stream.flush()


def _plan_options(args: argparse.Namespace) -> dict:
    opt = None if args.optimizer.lower() in ("none", "") else args.optimizer
    return dict(
        inner=args.inner,
        device=args.device,
        budget=args.budget,
        device_memory=args.device_memory,
        optimizer=opt if args.device_memory else None,
        passes=args.passes,
        allow_approximation=args.allow_approximation,
    )


def _plan_pipeline(args: argparse.Namespace) -> int:
    from memfit.planner import pipeline
    from memfit.trace import trace_step
    from memfit.units import parse_bytes

    stages = args.pipeline_stages
    micro = args.microbatches or 2 * stages
    progress = _Progress()
    with warnings.catch_warnings():
        if not args.debug:
            warnings.simplefilter("ignore")
        try:
            # one microbatch's step of the whole model, unchanged, with the checkpoint planner's curve
            be, param_bytes = trace_step(args.target, progress=progress, curve_points=8, strict=False,
                                         inner=args.inner, device=args.device, budget="1000TiB")
            progress(f"simulating {len(pipeline.SCHEDULES)} schedules x the stage checkpoint plans "
                     f"({stages} stages, {micro} microbatches)")
            options = pipeline.stage_options_from_step(be, stages, param_bytes=param_bytes)
            result = pipeline.plan(options, stages, micro, budget=parse_bytes(args.budget, what="budget"),
                                   comm_s=args.comm_ms / 1e3)
        finally:
            progress.done()
    print(result.verdict())
    for c in result.considered[:12]:
        mark = "*" if result.chosen is not None and (c.schedule, c.option) == (result.chosen.name, result.option.label) else " "
        print(f"  {mark} {c.schedule:7s} {c.option:56s} step {c.step_time * 1e3:9.2f} ms  bubble {100 * c.bubble_rate:5.1f}%"
              f"  peak {format_bytes(c.peak_activations):>11}  {'fits' if c.fits else 'over'}")
    if len(result.considered) > 12:
        print(f"  ... {len(result.considered) - 12} more in the report")
    paths = pipeline.write_report(result, args.report, title=args.title or args.target) if args.report else []
    _wrote(paths)
    return EXIT_OK if result.fits else EXIT_DOES_NOT_FIT


def _plan(args: argparse.Namespace) -> int:
    from memfit.planner import report as rp
    from memfit.trace import trace_step

    if args.pipeline_stages is not None:
        return _plan_pipeline(args)
    progress = _Progress()
    with warnings.catch_warnings():
        if not args.debug:
            warnings.simplefilter("ignore")
        try:
            be, _ = trace_step(args.target, progress=progress, curve_points=8, strict=False, **_plan_options(args))
        finally:
            progress.done()
    rep = rp.build_report(be, title=args.title or args.target)
    paths = rp.write(rep, args.report) if args.report else []
    print(rep["verdict"])
    print(f"  {rep['budget_description']}")
    for c in rep["candidates"]:
        mark = "*" if c["chosen"] else " "
        print(
            f"  {mark} {c['graph']} {c['label']:<28} peak {format_bytes(c['peak']):>11}  time {c['time_s'] * 1e3:10.2f} ms"
            f"  {'fits' if c['fits'] else 'over'}{'' if c['exact'] else ' (approximate)'}"
        )
    _wrote(paths)
    for msg in be.infeasible:
        print(msg, file=sys.stderr)
    return EXIT_OK if rep["fits"] and not be.infeasible else EXIT_DOES_NOT_FIT


def _bench(args: argparse.Namespace) -> int:
    import torch

    from memfit import MemfitBackend
    from memfit.config import make_options
    from memfit.measurement import measure, training_step
    from memfit.planner import report as rp
    from memfit.trace import build_step, load_factory

    progress = _Progress()
    model, fargs, fkwargs, loss_fn = build_step(load_factory(args.target), fake=False)
    progress("measuring the step under plain torch.compile")
    torch._dynamo.reset()
    dev = next(model.parameters()).device
    baseline = measure(training_step(torch.compile(model), fargs, fkwargs, loss_fn), device=dev, repeat=args.repeat)
    progress(f"plain torch.compile: {baseline}; planning and measuring memfit")
    torch._dynamo.reset()
    be = MemfitBackend(make_options(_plan_options(args)))
    be.curve_points = 8
    be.progress = progress
    with warnings.catch_warnings():
        if not args.debug:
            warnings.simplefilter("ignore")
        planned = measure(
            training_step(torch.compile(model, backend=be), fargs, fkwargs, loss_fn), device=dev, repeat=args.repeat
        )
    progress.done()
    rep = rp.build_report(be, title=args.title or args.target, measured={"baseline": baseline, "memfit": planned})
    paths = rp.write(rep, args.report) if args.report else []
    print(rep["verdict"])
    print(f"  measured: plain torch.compile {baseline}; memfit {planned}")
    budget = rep["budget"]["budget"] if rep["budget"] else None
    if budget is not None:
        print(f"  measured peak / budget: {planned.peak_bytes / budget:.3f}")
    _wrote(paths)
    return EXIT_OK if rep["fits"] else EXIT_DOES_NOT_FIT


def _wrote(paths: list[str]) -> None:
    if paths:
        print(f"wrote {', '.join(paths)}", file=sys.stderr)
    else:
        print("no report written (give --report PATH for HTML, Markdown and JSON)", file=sys.stderr)


def _analyze(args: argparse.Namespace) -> int:
    from memfit.trace import analyze

    print(f"memfit: tracing one training step of {args.target} on fake tensors ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        if not args.debug:
            warnings.simplefilter("ignore")
        analysis = analyze(
            args.target,
            inner=args.inner,
            device=args.device,
            budget=args.budget,
            passes=args.passes,
            fewbit_bits=args.fewbit_bits,
            fewbit_tables=args.fewbit_tables,
        )
    elapsed = time.perf_counter() - t0
    print(analysis.format(top=args.top, title=f"memfit analyze {args.target}  ({args.inner} graphs, {elapsed:.1f} s)"))
    if args.json:
        data = analysis.to_json(top=args.top)
        data["target"] = args.target
        data["inner"] = args.inner
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    return EXIT_OK


def _target_problem(target: str) -> str | None:
    """What is wrong with TARGET that can be told without importing it (or torch): a missing file, a
    module that cannot be found. Mirrors ``memfit.trace.load_factory``, which says the rest."""
    import importlib.util

    from memfit.config import split_target

    path, _name, is_file = split_target(target)
    if is_file:
        return None if os.path.isfile(path) else f"no such file: {path}"
    try:
        found = importlib.util.find_spec(path) is not None
    except (ImportError, ValueError) as e:
        return f"cannot import module {path!r}: {e}"
    return None if found else f"cannot import module {path!r}: no module named {path!r}"


def _check_early(args: argparse.Namespace) -> None:
    """Every argument that can be checked before torch is imported (5-6 s here), so that a typo is told
    at once and nothing about tracing is printed first. Raises ValueError with the one-line reason."""
    from memfit.config import make_options

    problem = _target_problem(args.target)
    if problem:
        raise ValueError(problem)
    if args.command == "analyze":
        if args.top < 0:
            raise ValueError(f"--top {args.top} must be >= 0")
        make_options(inner=args.inner, device=args.device, budget=args.budget, passes=args.passes,
                     fewbit_bits=args.fewbit_bits, fewbit_tables=args.fewbit_tables)
        if args.json and os.path.isdir(args.json):
            raise ValueError(f"--json {args.json!r} is a folder; give a file path")
        return
    if args.command == "bench" and args.repeat < 1:
        raise ValueError(f"--repeat {args.repeat} must be >= 1")
    if args.command == "plan" and args.pipeline_stages is not None:
        if args.pipeline_stages < 2:
            raise ValueError(f"--pipeline-stages {args.pipeline_stages} must be >= 2 (one stage is no pipeline)")
        if args.microbatches is not None and args.microbatches < 1:
            raise ValueError(f"--microbatches {args.microbatches} must be >= 1")
        if args.comm_ms < 0:
            raise ValueError(f"--comm-ms {args.comm_ms} must be >= 0")
        if args.budget is None:
            raise ValueError("--pipeline-stages plans against a per-stage --budget (activations above resident memory); "
                             "--device-memory is not supported with it")
    elif args.command == "plan" and (args.microbatches is not None or args.comm_ms):
        raise ValueError("--microbatches and --comm-ms apply to a pipeline plan: add --pipeline-stages N")
    make_options(_plan_options(args))
    if args.report:
        from memfit.config import report_paths

        report_paths(args.report)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check_early(args)
    except ValueError as e:
        if getattr(args, "debug", False):
            raise
        print(f"memfit: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from memfit import BudgetError
    from memfit.trace import TargetError

    try:
        if args.command == "analyze":
            return _analyze(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "bench":
            return _bench(args)
    except BudgetError as e:
        print(str(e).splitlines()[0], file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    except (TargetError, ValueError, OSError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"memfit: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
