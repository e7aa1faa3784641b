"""`nanoseek bench ...`: the benchmarks, each comparing nanoseek with the tool people use.

- `bench train` (bench/train.py): training tokens/s against transformers' DeepseekV3ForCausalLM;
- `bench decode` (bench/decode.py): the engine's decoding tokens/s against transformers' generate;
- `bench grpo` (bench/grpo.py): seconds per GRPO step against TRL's GRPOTrainer;
- `bench prefix` (bench/prefix.py): time to first token of a long conversation's turns, the
  engine with its prefix cache against the engine without it.

Each module provides `add_arguments(parser)` for its options and `main(args) -> int`; the
libraries they compare against are imported only when a benchmark runs.
"""

from __future__ import annotations

from nanoseek.bench import decode, grpo, prefix, train

BENCHES = {
    "train": (train, "training tokens/s: nanoseek vs transformers' DeepseekV3ForCausalLM"),
    "decode": (decode, "decoding tokens/s: nanoseek's engine vs transformers' generate"),
    "grpo": (grpo, "seconds per GRPO step: nanoseek vs TRL's GRPOTrainer"),
    "prefix": (prefix, "time to first token of a long conversation: the engine with and without its prefix cache"),
}


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks against transformers and TRL (train, decode, grpo)")
    bench_sub = p.add_subparsers(dest="bench", metavar="BENCH")
    for name, (module, help_) in BENCHES.items():
        b = bench_sub.add_parser(name, help=help_)
        module.add_arguments(b)
        b.set_defaults(func=module.main)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
