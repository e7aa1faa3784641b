"""`nanoseek bench ...`: the benchmarks, each comparing nanoseek with the tool people use.

Each benchmark module provides `main(args) -> int` and, for its options, `add_arguments(parser)`;
one that is not built yet is left out of the menu.
"""

from __future__ import annotations

import importlib

BENCHES = {
    "train": ("nanoseek.train.bench", "training tokens/s: nanoseek vs transformers' DeepseekV3ForCausalLM"),
    "decode": ("nanoseek.infer.bench", "decoding tokens/s: nanoseek's engine vs transformers' generate"),
    "grpo": ("nanoseek.train.grpo_bench", "seconds per GRPO step: nanoseek vs TRL's GRPOTrainer"),
}


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks against transformers and TRL (train, decode, grpo)")
    bench_sub = p.add_subparsers(dest="bench", metavar="BENCH")
    for name, (module_name, help_) in BENCHES.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                continue
            raise
        if not hasattr(module, "main"):
            continue
        b = bench_sub.add_parser(name, help=help_)
        if hasattr(module, "add_arguments"):
            module.add_arguments(b)
        b.set_defaults(func=module.main)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
