"""The `nanoseek` command. Each area registers its subcommands; errors print as one line."""

from __future__ import annotations

import argparse
import sys

from nanoseek import bench, cost, demo, distill, eval_cli, r1
from nanoseek.data import cli as data_cli
from nanoseek.errors import NanoseekError
from nanoseek.infer import cli as infer_cli
from nanoseek.io import cli as io_cli
from nanoseek.io import convert
from nanoseek.serve import cli as serve_cli
from nanoseek.train import cli as train_cli

# Each module's `register(subparsers)` adds its subcommands; each sets `func(args) -> int | None`.
COMMAND_MODULES = [demo, r1, distill, eval_cli, cost, io_cli, convert, data_cli, train_cli, infer_cli, serve_cli, bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek-V3 / R1 in one readable codebase")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except NanoseekError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
