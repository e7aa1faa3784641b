"""The `nanoseek` command. Each area registers its subcommands; errors print as one line."""

from __future__ import annotations

import argparse
import importlib
import sys

from nanoseek.errors import NanoseekError

# Modules that expose `register(subparsers)`; each subcommand sets `func(args) -> int | None`.
COMMAND_MODULES = [
    "nanoseek.demo",
    "nanoseek.io.cli",
    "nanoseek.io.convert",
    "nanoseek.data.cli",
    "nanoseek.train.cli",
    "nanoseek.infer.cli",
    "nanoseek.serve.cli",
    "nanoseek.bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek-V3 / R1 in one readable codebase")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):  # the area is not built yet
                continue
            raise
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
