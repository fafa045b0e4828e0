"""``python -m bench.kernels [--quick] [--out DIR] [--strict]``: run the kernel benchmarks."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from bench import kernels
from bench.kernels.runner import run
from bench.procs import ROOT
from bench.report import command_line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.kernels",
        description=kernels.__doc__.splitlines()[0] if kernels.__doc__ else None,
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller inputs")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results", help="where the figures go"
    )
    parser.add_argument("--strict", action="store_true", help="exit 2 when a target is missed")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run, write the figures."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    return run(args.quick, args.out, command_line(argv, "bench.kernels"), strict=args.strict)


if __name__ == "__main__":
    sys.exit(main())
