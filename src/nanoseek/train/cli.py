"""`nanoseek pretrain` and `nanoseek sft` (also under `torchrun --nproc_per_node=N`), and `nanoseek grpo`."""

from __future__ import annotations


def register(sub) -> None:
    for stage, help_, example in (
        ("pretrain", "pretrain a model with the DeepSeek-V3 recipe", "steps=100 data.files=[corpus.jsonl]"),
        ("sft", "supervised fine-tuning on chat conversations (loss on assistant tokens)", "steps=100 lr=1e-4"),
        (
            "grpo",
            "reinforcement learning with GRPO and verifiable rewards (R1-Zero)",
            "init_from=runs/pretrain/hf steps=20",
        ),
    ):
        p = sub.add_parser(stage, help=help_)
        p.add_argument(
            "--config",
            help=f"YAML config (e.g. configs/{stage}-tiny.yaml)"
            + ("; keys: GRPORunConfig in nanoseek/train/grpo.py" if stage == "grpo" else ""),
        )
        p.add_argument(
            "--set",
            dest="overrides",
            action="extend",
            nargs="+",
            default=[],
            metavar="KEY=VALUE",
            help=f"override a config key, e.g. --set {example} (repeatable)",
        )
        p.add_argument("--out", required=True, help="output directory: checkpoints, metrics, plots, hf/ model")
        p.add_argument(
            "--resume",
            nargs="?",
            const="latest",
            metavar="CHECKPOINT",
            help="resume from CHECKPOINT (default: the newest in OUT). Without this flag a run "
            "resumes from OUT's newest checkpoint if there is one",
        )
        p.set_defaults(func=run_grpo if stage == "grpo" else run_stage, stage=stage)


def run_stage(args) -> int:
    from nanoseek.train.config import load_config
    from nanoseek.train.pretrain import train
    from nanoseek.train.sft import SFTConfig

    cfg = load_config(args.config, args.overrides, cls=SFTConfig if args.stage == "sft" else None)
    train(cfg, args.out, stage=args.stage, resume=args.resume)
    return 0


def run_grpo(args) -> int:
    from nanoseek.train.config import load_config
    from nanoseek.train.grpo import GRPORunConfig, run

    run(load_config(args.config, args.overrides, cls=GRPORunConfig), args.out, resume=args.resume)
    return 0
