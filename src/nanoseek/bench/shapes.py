"""The model a benchmark runs: a preset, or a preset with another expert count.

DeepSeek's speed questions live at its expert counts (V2-Lite routes 6 of 64 experts, V3 8 of
256), so each benchmark takes `--experts E --active K` besides `--preset`: the preset's widths
with E routed experts, K of them active per token. The shape travels as one string, "small" or
"small:64/6", through the benchmarks and into their reports.

Routing stays the preset's (V3's sigmoid gate with the bias, group-limited): 8 groups with the
top 4 kept where E is a multiple of 8 of at least 64 (V3's own grouping at 256), else the
preset's groups where they divide E into groups of 2 or more, else one group.

A benchmark that also runs the dense students (`bench decode`) takes their presets by name
(`r1-distill-qwen-1.5b`, ..., `student`: nanoseek.dense.DENSE_PRESETS); they have no experts.
"""

from __future__ import annotations

from dataclasses import replace

from nanoseek.config import PRESETS, ModelConfig
from nanoseek.dense import DENSE_PRESETS, DenseConfig
from nanoseek.errors import NanoseekError


def add_arguments(p, what: str = "model preset with random weights", dense: bool = False) -> None:
    """`--preset` (with `dense`: DeepSeek's presets and the dense students'), `--experts`, `--active`."""
    choices = sorted(PRESETS) + (list(DENSE_PRESETS) if dense else [])
    p.add_argument("--preset", default="small", choices=choices, help=f"{what} (default small)")
    p.add_argument("--experts", type=int, metavar="E", help="routed experts (default: the preset's)")
    p.add_argument("--active", type=int, metavar="K", help="experts active per token (default: the preset's)")


def spec(args) -> str:
    """The shape of the parsed flags as one string: "small", or "small:16/4"."""
    experts, active = getattr(args, "experts", None), getattr(args, "active", None)
    if experts is None and active is None:
        return args.preset
    if is_dense(args.preset):
        raise NanoseekError(f"--experts/--active: {args.preset} is a dense model, it has no experts")
    base = ModelConfig.preset(args.preset)
    return f"{args.preset}:{experts or base.n_routed_experts}/{active or base.num_experts_per_tok}"


def is_dense(shape: str) -> bool:
    """Whether the shape names a dense student preset (nanoseek.dense) rather than a DeepSeek one."""
    return shape in DENSE_PRESETS


def dense_config(shape: str) -> DenseConfig:
    if not is_dense(shape):
        raise NanoseekError(f"unknown dense preset {shape!r} (expected one of {', '.join(DENSE_PRESETS)})")
    return DenseConfig.preset(shape)


def model_config(shape: str) -> ModelConfig:
    """The ModelConfig of a shape string; a bad expert count is a one-line error naming the flags."""
    preset, _, experts = shape.partition(":")
    if is_dense(preset):
        raise NanoseekError(f"{preset} is a dense student preset: this benchmark runs DeepSeek presets only")
    if preset not in PRESETS:
        raise NanoseekError(f"unknown preset {preset!r} (expected one of {', '.join(sorted(PRESETS))})")
    config = ModelConfig.preset(preset)
    if not experts:
        return config
    try:
        e, k = (int(x) for x in experts.split("/"))
    except ValueError:
        raise NanoseekError(f"model shape {shape!r}: expected PRESET:EXPERTS/ACTIVE") from None
    if not 1 <= k <= e:
        raise NanoseekError(f"--experts {e} --active {k}: need 1 <= active <= experts")
    if e >= 64 and e % 8 == 0:
        groups, kept = 8, 4
    elif e % config.n_group == 0 and e // config.n_group >= 2:
        groups, kept = config.n_group, config.topk_group
    else:
        groups, kept = 1, 1
    while kept < groups and kept * (e // groups) < k:  # the kept groups must hold K experts
        kept += 1
    config = replace(config, n_routed_experts=e, num_experts_per_tok=k, n_group=groups, topk_group=kept)
    config.validate()
    return config
