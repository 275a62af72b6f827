"""The ``flax-qmha`` command line."""

from __future__ import annotations

import argparse
import sys


def _build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="flax-qmha",
      description="PyTorch's quantizable multi-head attention for JAX/Flax.",
  )
  commands = parser.add_subparsers(dest="command", required=True)
  demo = commands.add_parser("demo", help="run the main demo")
  demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _build_parser().parse_args(argv)
  if args.command == "demo":
    from flax_qmha._demo import run_demo

    return run_demo(seed=args.seed)
  return 2  # unreachable: argparse rejects unknown commands


if __name__ == "__main__":
  sys.exit(main())
