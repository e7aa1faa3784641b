"""Training metrics: one JSON object per logged step in OUT/metrics.jsonl, the same numbers as
TensorBoard scalars in OUT/tensorboard, and PNG plots drawn from the JSONL at the end."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by a crash: everything after it is gone too
    return records


class Metrics:
    """Appends to OUT/metrics.jsonl. A run resumed at step S first drops records after S, so
    the file reads as one run; TensorBoard purges them the same way."""

    def __init__(self, out: str | Path, start_step: int = 0, tensorboard: bool = True):
        self.path = Path(out) / "metrics.jsonl"
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step] if start_step else []
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self.file = open(self.path, "a", encoding="utf-8")
        self.writer = None
        if tensorboard:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(Path(out) / "tensorboard"), purge_step=start_step + 1 if start_step else None)
            except ImportError:
                warnings.warn("tensorboard is not installed: metrics go to metrics.jsonl only")

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            step = record["step"]
            for key, value in _scalars(record):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def _scalars(record: dict, prefix: str = ""):
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            yield prefix + key, value
        elif isinstance(value, list):
            for i, v in enumerate(value):
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    yield f"{prefix}{key}/{i}", v


def _figure(path: Path, title: str, ylabel: str, series, logy: bool = False) -> Path:
    """One PNG: `series` is [(label, steps, values)]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, steps, values in series:
        ax.plot(steps, values, label=label)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_metrics(metrics_file: str | Path, out_dir: str | Path) -> list[Path]:
    """loss.png (main and MTP depths), lr.png and expert_load.png (max / mean load per MoE layer)."""
    records = [r for r in read_metrics(metrics_file) if "loss" in r and "event" not in r]
    if not records:
        return []
    out_dir = Path(out_dir)
    steps = [r["step"] for r in records]
    written: list[Path] = []

    def figure(name, title, ylabel, series, logy=False):
        written.append(_figure(out_dir / name, title, ylabel, [(label, steps, v) for label, v in series], logy))

    loss = [("main (next token)", [r["loss"] for r in records])]
    depth = max((len(r.get("loss_mtp") or []) for r in records), default=0)
    for k in range(depth):
        loss.append((f"MTP depth {k + 1}", [(r.get("loss_mtp") or [math.nan] * depth)[k] for r in records]))
    figure("loss.png", "Training loss", "cross-entropy (nats)", loss)
    figure("lr.png", "Learning rate", "lr", [("lr", [r.get("lr", math.nan) for r in records])])
    layers = max((len(r.get("expert_load") or []) for r in records), default=0)
    if layers:
        figure("expert_load.png", "Expert load (max / mean tokens per expert)", "max / mean",
               [(f"MoE layer {i}", [(r.get("expert_load") or [math.nan] * layers)[i] for r in records])
                for i in range(layers)])
    return written


def plot_grpo(metrics_file: str | Path, out_dir: str | Path) -> list[Path]:
    """The RL curves: reward.png (reward, accuracy, share of all-equal groups), length.png
    (completion and thinking tokens) and kl_entropy.png."""
    records = [r for r in read_metrics(metrics_file) if "reward_mean" in r]
    if not records:
        return []
    out_dir = Path(out_dir)
    steps = [r["step"] for r in records]

    def series(*keys_labels):
        return [(label, steps, [r.get(key, math.nan) for r in records]) for key, label in keys_labels
                if any(key in r for r in records)]

    return [
        _figure(out_dir / "reward.png", "Rewards per GRPO step", "mean over the step's completions",
                series(("reward_mean", "reward"), ("accuracy", "accuracy"), ("format", "format"),
                       ("all_equal_groups", "groups with all-equal rewards"))),
        _figure(out_dir / "length.png", "Response length per GRPO step", "tokens",
                series(("completion_len_mean", "completion (mean)"), ("thinking_len_mean", "thinking (mean)"),
                       ("thinking_len_max", "thinking (max)"))),
        _figure(out_dir / "kl_entropy.png", "KL to the reference and policy entropy", "nats per token",
                series(("kl", "KL (k3)"), ("entropy", "entropy"), ("clip_fraction", "clip fraction"))),
    ]
