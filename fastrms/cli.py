"""The ``fastrms`` command: ``bench`` (the benchmark report), ``demo``, and ``info``.

Each subcommand lives in its own module, which provides ``add_parser(subparsers)``; the parser
it adds sets ``func`` to a callable taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import platform
import sys


def _info(args: argparse.Namespace) -> int:
    import numpy as np

    import fastrms

    print(
        f"fastrms {fastrms.__version__} "
        f"(Python {platform.python_version()}, NumPy {np.__version__})"
    )
    for module in ("numba", "numba_cuda", "scipy", "torch", "cupy"):
        print(f"  {module:<11} {_version(module)}")
    print("backends:")
    for name, info in fastrms.backends().items():
        state = "available  " if info.available else "unavailable"
        print(f"  {name:<6} {state}  {info.detail}")
    return 0


def _version(module: str) -> str:
    from importlib import metadata

    dist = {"numba_cuda": "numba-cuda"}.get(module, module)
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def build_parser() -> argparse.ArgumentParser:
    from .tools.bench import command as bench
    from .tools.demo import command as demo

    parser = argparse.ArgumentParser(
        prog="fastrms", description="Fused, in-place optimizer steps at memory speed."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    bench.add_parser(sub)
    demo.add_parser(sub)
    info = sub.add_parser("info", help="backends, devices, threads and library versions")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
