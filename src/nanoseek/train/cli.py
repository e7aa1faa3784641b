"""`nanoseek pretrain` and `nanoseek sft` (also under `torchrun --nproc_per_node=N`), and `nanoseek grpo`."""

from __future__ import annotations


def register(sub) -> None:
    for stage, help_ in (("pretrain", "pretrain a model with the DeepSeek-V3 recipe"),
                         ("sft", "supervised fine-tuning on chat conversations (loss on assistant tokens)")):
        p = sub.add_parser(stage, help=help_)
        p.add_argument("--config", help=f"YAML config (e.g. configs/{stage}-tiny.yaml)")
        p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set steps=100 data.files=[corpus.jsonl] (repeatable)")
        p.add_argument("--out", required=True, help="output directory: checkpoints, metrics, plots, hf/ model")
        p.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                       help="resume from CHECKPOINT (default: the newest in OUT). Without this flag a run "
                            "resumes from OUT's newest checkpoint if there is one")
        p.set_defaults(func=run_stage, stage=stage)
    p = sub.add_parser("grpo", help="reinforcement learning with GRPO and verifiable rewards (R1-Zero)")
    p.add_argument("--config", help="YAML config (e.g. configs/grpo-tiny.yaml); keys: GRPORunConfig "
                                    "in nanoseek/train/grpo.py")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set init_from=runs/pretrain/hf steps=20 (repeatable)")
    p.add_argument("--out", required=True, help="output directory: checkpoints, metrics, plots, hf/ model")
    p.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="resume from CHECKPOINT (default: the newest in OUT). Without this flag a run "
                        "resumes from OUT's newest checkpoint if there is one")
    p.set_defaults(func=run_grpo)


def run_stage(args) -> int:
    from nanoseek.train.config import load_config
    from nanoseek.train.pretrain import train

    cfg = load_config(args.config, args.overrides)
    if args.stage == "sft":
        from nanoseek.train.sft import check_sft_config

        check_sft_config(cfg)
    train(cfg, args.out, stage=args.stage, resume=args.resume)
    return 0


def run_grpo(args) -> int:
    from nanoseek.train.config import load_config
    from nanoseek.train.grpo import GRPORunConfig, run

    run(load_config(args.config, args.overrides, cls=GRPORunConfig), args.out, resume=args.resume)
    return 0
