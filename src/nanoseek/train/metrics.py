"""Training metrics: one JSON object per logged step in OUT/metrics.jsonl, the same numbers as
TensorBoard scalars in OUT/tensorboard, and PNG plots drawn from the JSONL at the end."""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
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
                purge = start_step + 1 if start_step else None
                self.writer = SummaryWriter(str(Path(out) / "tensorboard"), purge_step=purge)
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


# ---------------------------------------------------------------------------------------
# Plots: each figure shows only what ran (no KL curve without a KL term, no MTP curve without
# MTP), and shares in [0, 1] get their own axis.
# ---------------------------------------------------------------------------------------
@dataclass
class Panel:
    """One axes of a figure: `lines` are (label, steps, values)."""

    title: str
    ylabel: str
    lines: list[tuple[str, list, list]]
    ylim: tuple[float, float] | None = None
    logy: bool = False

    @property
    def labels(self) -> list[str]:
        return [label for label, _, _ in self.lines]


@dataclass
class Plot:
    """A PNG that was written, and what it shows (so a test can check what was drawn)."""

    path: Path
    panels: list[Panel]

    @property
    def titles(self) -> list[str]:
        return [panel.title for panel in self.panels]

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)


def _draw(path: Path, panels: list[Panel]) -> Plot:
    """The panels side by side in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 1, 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, steps, values in panel.lines:
            ax.plot(steps, values, label=label)
        ax.set(title=panel.title, xlabel="step", ylabel=panel.ylabel)
        if panel.ylim:
            ax.set_ylim(*panel.ylim)
        if panel.logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if len(panel.lines) > 1:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Plot(path, panels)


def _curve(records: list[dict], key: str, index: int | None = None) -> list[float]:
    """The values of `key` (or of its list's `index`-th item) per record; NaN where absent."""
    out = []
    for r in records:
        v = r.get(key)
        if index is not None:
            v = v[index] if isinstance(v, list) and index < len(v) else None
        out.append(v if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan)
    return out


def _ran(values: list[float]) -> bool:
    """Whether a curve holds anything: some value present and not zero (a KL of a run with
    beta 0, or a clip fraction that never clipped, is all zeros)."""
    return any(math.isfinite(v) and v != 0 for v in values)


def plot_metrics(metrics_file: str | Path, out_dir: str | Path, moe_names: list[str] | None = None) -> list[Plot]:
    """loss.png (main and MTP depths), lr.png and expert_load.png (max / mean load per MoE
    layer, labelled by `moe_names`, e.g. Transformer.named_moe_layers(): "layer 1", "MTP 1")."""
    records = [r for r in read_metrics(metrics_file) if "loss" in r and "event" not in r]
    if not records:
        return []
    out_dir = Path(out_dir)
    steps = [r["step"] for r in records]
    written: list[Plot] = []

    loss = [("main (next token)", steps, _curve(records, "loss"))]
    depth = max((len(r.get("loss_mtp") or []) for r in records), default=0)
    loss += [(f"MTP depth {k + 1}", steps, _curve(records, "loss_mtp", k)) for k in range(depth)]
    written.append(_draw(out_dir / "loss.png", [Panel("Training loss", "cross-entropy (nats)", loss)]))
    written.append(_draw(out_dir / "lr.png", [Panel("Learning rate", "lr", [("lr", steps, _curve(records, "lr"))])]))
    layers = max((len(r.get("expert_load") or []) for r in records), default=0)
    names = moe_names if moe_names and len(moe_names) == layers else [f"MoE layer {i}" for i in range(layers)]
    # A layer with no load logged did not run (the MTP module when its loss is off): no line.
    loads = [(names[i], steps, _curve(records, "expert_load", i)) for i in range(layers)]
    loads = [line for line in loads if any(math.isfinite(v) for v in line[2])]
    if loads:
        written.append(
            _draw(
                out_dir / "expert_load.png", [Panel("Expert load (max / mean tokens per expert)", "max / mean", loads)]
            )
        )
    return written


# GRPO: the metric keys, with their labels, of each panel.
GRPO_SHARES = (
    ("accuracy", "accuracy"),
    ("format", "format rate"),
    ("all_equal_groups", "groups with all-equal rewards"),
)
GRPO_LENGTHS = (
    ("completion_len_mean", "completion (mean)"),
    ("thinking_len_mean", "thinking (mean)"),
    ("thinking_len_max", "thinking (max)"),
)


def plot_grpo(metrics_file: str | Path, out_dir: str | Path) -> list[Plot]:
    """The RL curves: reward.png (the mean reward; the shares, accuracy, format and all-equal
    groups, on a [0, 1] axis), length.png (completion and thinking tokens), kl_entropy.png
    (policy entropy; the KL to the reference only when beta > 0 made one, the clip fraction
    only when something was clipped) and, when some sample reflected, reflection.png (the share
    of samples that re-check themselves, overall and by difficulty, and the accuracy of samples
    with and without it)."""
    records = [r for r in read_metrics(metrics_file) if "reward_mean" in r]
    if not records:
        return []
    out_dir = Path(out_dir)
    steps = [r["step"] for r in records]

    def lines(keys_labels, keep=lambda values: any(math.isfinite(v) for v in values)):
        found = [(label, steps, _curve(records, key)) for key, label in keys_labels]
        return [line for line in found if keep(line[2])]

    figures = {
        "reward.png": [
            Panel("Reward per GRPO step", "mean over the step's completions", lines([("reward_mean", "reward")])),
            Panel("Shares per GRPO step", "share", lines(GRPO_SHARES), ylim=(0, 1)),
        ],
        "length.png": [Panel("Response length per GRPO step", "tokens", lines(GRPO_LENGTHS))],
        "kl_entropy.png": [
            Panel("Policy entropy", "nats per token", lines([("entropy", "entropy")])),
            Panel("KL to the reference", "nats per token", lines([("kl", "KL (k3)")], _ran)),
            Panel("PPO clip fraction", "share of tokens", lines([("clip_fraction", "clipped")], _ran)),
        ],
    }
    if _ran(_curve(records, "reflection")):  # the aha moment, drawn only when some sample re-checked itself
        figures["reflection.png"] = _reflection_panels(records, steps)
    written = []
    for name, panels in figures.items():
        panels = [panel for panel in panels if panel.lines]
        if panels:
            written.append(_draw(out_dir / name, panels))
    return written


SMOOTH = 5  # steps of the running mean on reflection.png: by difficulty a step holds a few samples


def _running_mean(values: list[float], window: int = SMOOTH) -> list[float]:
    """The mean of the last `window` finite values at each step (NaN until there is one)."""
    out = []
    for i in range(len(values)):
        seen = [v for v in values[max(0, i - window + 1) : i + 1] if math.isfinite(v)]
        out.append(sum(seen) / len(seen) if seen else math.nan)
    return out


def _reflection_panels(records: list[dict], steps: list) -> list[Panel]:
    prefix = "difficulty/"
    levels = sorted(
        {k.split("/")[1] for r in records for k in r if k.startswith(prefix) and k.endswith("/reflection")}, key=float
    )
    share = [("all samples", steps, _running_mean(_curve(records, "reflection")))]
    share += [(f"difficulty {d}", steps, _running_mean(_curve(records, f"{prefix}{d}/reflection"))) for d in levels]
    accuracy = [
        (label, steps, _running_mean(_curve(records, key)))
        for key, label in (("reflection_accuracy", "samples that reflect"), ("no_reflection_accuracy", "the others"))
    ]
    accuracy = [line for line in accuracy if any(math.isfinite(v) for v in line[2])]
    return [
        Panel(f"Samples that re-check themselves ({SMOOTH}-step mean)", "share", share, ylim=(0, 1)),
        Panel(f"Accuracy with and without reflection ({SMOOTH}-step mean)", "accuracy", accuracy, ylim=(0, 1)),
    ]
