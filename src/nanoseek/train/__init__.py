"""Training stages: pretraining and SFT (the V3 recipe), GRPO, and what they share:
configs, schedules, checkpoints, metrics and torch.distributed scale-out."""
