"""``memfit`` command line.

    memfit analyze examples/gpt.py [--json out.json] [--device h100] [--inner eager]

    memfit analyze --budget 2GiB examples/gpt.py   # plan activation checkpointing to fit 2 GiB
    memfit analyze --passes fewbit --fewbit-bits 2 examples/gpt.py   # few-bit activation gradients

Exit codes: 0 done; 2 bad input (missing file, no factory, the factory or the trace fails), with a
one-line reason on stderr and no traceback unless ``--debug``; 3 no plan fits the budget (the
message states the smallest peak memfit can reach).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_DOES_NOT_FIT = 3


def _parser() -> argparse.ArgumentParser:
    from memfit import __version__
    from memfit.planner.cost import DEVICE_PROFILES

    p = argparse.ArgumentParser(prog="memfit", description="Make a PyTorch training step fit a memory budget.")
    p.add_argument("--version", action="version", version=f"memfit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
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
        help="comma-separated passes (checkpoint, fewbit, split_backward) or 'auto' (exact passes that change nothing "
        "about when gradients arrive; default)",
    )
    a.add_argument(
        "--fewbit-bits",
        type=int,
        default=2,
        metavar="N",
        help="bits per element of few-bit activation codes, 1-4 (with --passes fewbit; default: 2)",
    )
    a.add_argument("--top", type=int, default=10, metavar="N", help="how many saved values to list (default: 10)")
    a.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from memfit.backend import BudgetError
    from memfit.trace import TargetError

    try:
        if args.command == "analyze":
            if args.top < 0:
                raise TargetError(f"--top {args.top} must be >= 0")
            return _analyze(args)
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
