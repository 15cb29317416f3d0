"""``fastrms demo regression`` and ``fastrms demo paths``: run a demo, print it, plot it."""

from __future__ import annotations

import argparse
import sys
import time

from .paths import format_paths, run_paths
from .plots import PlotDependencyError, animate_paths, check_plotting, plot_paths, plot_regression
from .regression import fit_regression, format_regression
from .settings import PATH_OPTIMIZERS, REGRESSION_OPTIMIZERS
from .testfunctions import OBJECTIVES


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``demo regression`` and ``demo paths`` to the ``fastrms`` command."""
    demo = subparsers.add_parser("demo", help="worked examples: regression and optimizer paths")
    sub = demo.add_subparsers(dest="demo", required=True)

    reg = sub.add_parser(
        "regression",
        help="fit y = 4 + 3x + noise with a fastrms optimizer",
        description="Fit y = 4 + 3x + noise (100 samples) by full-batch or mini-batch descent "
        "and compare with scipy.linalg.lstsq.",
    )
    reg.add_argument(
        "--optimizer", choices=list(REGRESSION_OPTIMIZERS), default="rmsprop",
        help="default: rmsprop (alpha=0.9, eps inside the sqrt)",
    )  # fmt: skip
    reg.add_argument("--lr", type=float, help="learning rate (default: per optimizer; rmsprop 0.1)")
    reg.add_argument(
        "--lr-decay", type=float,
        help="epoch k uses lr / (1 + lr_decay*k) (default: 0 full batch, 0.05 mini-batch)",
    )  # fmt: skip
    reg.add_argument(
        "--batch-size", type=_positive_int, help="mini-batch size (default: full batch)"
    )
    reg.add_argument(
        "--tol",
        type=float,
        default=1e-6,
        help="stop when the loss changes by less than TOL in an epoch (default: 1e-6)",
    )
    reg.add_argument(
        "--max-iter", type=_positive_int, default=1000, help="most epochs to run (default: 1000)"
    )
    reg.add_argument(
        "--seed", type=int, default=0, help="seed of the data and the shuffles (default: 0)"
    )
    reg.add_argument("--plot", metavar="PATH", help="write the loss curve and the fit as a PNG")
    reg.set_defaults(func=_regression_command)

    paths = sub.add_parser(
        "paths",
        help="optimizer paths on Beale, Rosenbrock and a wavy bowl",
        description="Run each optimizer from a common start on each test function and tabulate "
        "where it ends.",
    )
    paths.add_argument(
        "--steps", type=_positive_int, default=1000, help="steps per path (default: 1000)"
    )
    paths.add_argument(
        "--functions", nargs="+", choices=list(OBJECTIVES), metavar="NAME",
        help=f"test functions (default: all of {', '.join(OBJECTIVES)})",
    )  # fmt: skip
    paths.add_argument(
        "--optimizers", nargs="+", choices=list(PATH_OPTIMIZERS), metavar="NAME",
        help=f"optimizers (default: all of {', '.join(PATH_OPTIMIZERS)})",
    )  # fmt: skip
    paths.add_argument("--plot", metavar="PATH", help="write a contour plot of the paths (PNG)")
    paths.add_argument("--animate", metavar="PATH.gif", help="write an animated GIF of the paths")
    paths.add_argument(
        "--frames", type=_positive_int, default=40, help="frames of the GIF (default: 40)"
    )
    paths.set_defaults(func=_paths_command)
    return demo


def _plot_error(exc: PlotDependencyError) -> int:
    print(f"fastrms demo: {exc}", file=sys.stderr)
    return 1


def _regression_command(args: argparse.Namespace) -> int:
    try:
        if args.plot:
            check_plotting()
        t0 = time.perf_counter()
        result = fit_regression(
            args.optimizer,
            batch_size=args.batch_size,
            lr=args.lr,
            lr_decay=args.lr_decay,
            tol=args.tol,
            max_iter=args.max_iter,
            seed=args.seed,
        )
        seconds = time.perf_counter() - t0
        print(format_regression(result))
        print(f"time: {seconds:.2f} s (compilation included on a first run)")
        if args.plot:
            plot_regression(result, args.plot)
            print(f"wrote {args.plot}")
    except PlotDependencyError as exc:
        return _plot_error(exc)
    return 0


def _paths_command(args: argparse.Namespace) -> int:
    try:
        if args.plot or args.animate:
            check_plotting()
        result = run_paths(args.functions, args.optimizers, args.steps)
        print(format_paths(result))
        print(f"time: {result.seconds:.2f} s (compilation included on a first run)")
        if args.plot:
            plot_paths(result, args.plot)
            print(f"wrote {args.plot}")
        if args.animate:
            n = animate_paths(result, args.animate, frames=args.frames)
            print(f"wrote {args.animate} ({n} frames)")
    except PlotDependencyError as exc:
        return _plot_error(exc)
    return 0
