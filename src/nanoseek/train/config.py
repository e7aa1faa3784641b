"""Training configs: dataclasses read from YAML, with `--set key=value` overrides.

Every key is checked against the dataclass: an unknown key or a value of the wrong type is a
NanoseekError that names the key and where it came from. Nested sections use dotted keys on
the command line (`--set data.files=[a.jsonl] model.hidden_size=64`). The `model` section
takes a `preset` and any ModelConfig field under its Hugging Face name.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nanoseek.config import PRESETS, ModelConfig
from nanoseek.errors import NanoseekError

PRECISIONS = ("fp32", "bf16", "fp8")
SCHEDULES = ("wsd", "cosine")
# Keys that may differ between a checkpoint and the run resuming it: extending a run, logging
# and checkpointing more or less often, or moving to other hardware (checkpoints hold full
# tensors, whatever the number of ranks) does not change what was trained so far.
RESUMABLE_KEYS = ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "tensorboard", "progress",
                  "device", "expert_parallel")


@dataclass
class DataConfig:
    files: list[str] = field(default_factory=list)  # text / jsonl / parquet files or directories
    tokenizer: str | None = None  # directory with tokenizer.json; SFT falls back to init_from's
    text_field: str = "text"  # pretraining: the field of a jsonl/parquet record holding the document
    messages_field: str = "messages"  # SFT: the field holding the chat messages
    shuffle: bool = True


@dataclass
class TrainConfig:
    # The model: a preset plus ModelConfig fields, or a Hugging Face checkpoint to start from.
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "tiny"})
    init_from: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    seq_len: int = 256
    document_mask: bool = False  # attend within each packed document only (V3 packs without a mask)
    batch_size: int = 16  # sequences per optimizer step, over all ranks
    micro_batch_size: int | None = None  # sequences per forward on one rank; the rest is accumulation
    steps: int = 300
    seed: int = 0
    # AdamW and the learning-rate schedule (V3 section 4.2)
    lr: float = 3e-3
    min_lr: float = 3e-4
    schedule: str = "wsd"  # wsd: warm-up, constant, cosine decay, low tail (V3); cosine: warm-up then cosine
    warmup_steps: int = 20
    decay_fraction: float = 0.3  # wsd: share of the steps spent in the cosine decay
    tail_fraction: float = 0.0  # wsd: share of the steps held at min_lr at the end
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # DeepSeek-V3 objectives: MTP weight lambda, aux-loss-free bias step gamma, balance-loss weight alpha
    mtp_lambda: float = 0.3
    bias_gamma: float = 0.001
    balance_alpha: float = 0.0001
    # Loss-spike guard: skip a batch whose loss is non-finite or above spike_factor x running mean;
    # after rollback_after spikes in a row, go back to the last checkpoint.
    spike_factor: float = 2.0
    spike_warmup: int = 10  # steps before the running mean is trusted
    rollback_after: int = 3
    # Running
    precision: str = "fp32"
    device: str = "auto"  # auto, cpu, cuda
    expert_parallel: bool = False  # under torchrun: split routed experts across ranks
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True

    def validate(self) -> None:
        def bad(key, msg):
            raise NanoseekError(f"config key '{key}': {msg}")

        for key in ("seq_len", "batch_size", "steps", "checkpoint_every", "keep_checkpoints", "log_every",
                    "rollback_after"):
            if getattr(self, key) < 1:
                bad(key, f"must be at least 1, got {getattr(self, key)}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            bad("micro_batch_size", f"must be at least 1, got {self.micro_batch_size}")
        for key in ("warmup_steps", "spike_warmup"):
            if getattr(self, key) < 0:
                bad(key, f"must be >= 0, got {getattr(self, key)}")
        for key in ("lr", "min_lr", "weight_decay", "grad_clip", "mtp_lambda", "bias_gamma", "balance_alpha"):
            if getattr(self, key) < 0:
                bad(key, f"must be >= 0, got {getattr(self, key)}")
        if self.min_lr > self.lr:
            bad("min_lr", f"{self.min_lr} is above lr {self.lr}")
        if not (0 <= self.decay_fraction <= 1 and 0 <= self.tail_fraction <= 1
                and self.decay_fraction + self.tail_fraction <= 1):
            bad("decay_fraction", "decay_fraction and tail_fraction must be in [0, 1] and sum to at most 1")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                bad(key, f"must be in [0, 1), got {getattr(self, key)}")
        if self.spike_factor <= 1:
            bad("spike_factor", f"must be above 1, got {self.spike_factor}")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"'{self.schedule}' is not one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            bad("precision", f"'{self.precision}' is not one of {', '.join(PRECISIONS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            bad("device", f"'{self.device}' is not one of auto, cpu, cuda")
        if self.init_from is None:
            preset = self.model.get("preset", "tiny")
            if preset not in PRESETS:
                bad("model.preset", f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")

    def model_config(self) -> ModelConfig:
        """The ModelConfig of `model`: its preset with the other keys replaced."""
        overrides = {k: v for k, v in self.model.items() if k != "preset"}
        try:
            return ModelConfig(**{**PRESETS[self.model.get("preset", "tiny")], **overrides})
        except NanoseekError as e:
            raise NanoseekError(f"config section 'model': {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------
# Reading YAML and --set overrides, with the type of every key checked.
# ---------------------------------------------------------------------------------------
def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), cls=None):
    """A config (TrainConfig unless `cls` says otherwise) from a YAML file (or the defaults),
    then `key=value` overrides; `cls.validate()` runs last."""
    cls = cls or TrainConfig
    raw: dict = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise NanoseekError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise NanoseekError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise NanoseekError(f"{path}: expected a mapping of keys to values at the top level")
        raw = loaded or {}
    cfg = from_dict(cls, raw, where)
    for item in overrides:
        cfg = apply_override(cfg, item)
    cfg.validate()
    return cfg


def from_dict(cls, raw: dict, where: str, prefix: str = ""):
    """Build dataclass `cls` from `raw`, checking every key and value type."""
    if not isinstance(raw, dict):
        raise NanoseekError(f"{where}: section '{prefix.rstrip('.')}' must be a mapping, got {raw!r:.60}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        full = prefix + str(key)
        if key not in names:
            raise NanoseekError(f"{where}: unknown config key '{full}' (known: {', '.join(sorted(names))})")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = from_dict(kind, value if value is not None else {}, where, full + ".")
        elif key == "model" and cls is TrainConfig:
            kwargs[key] = check_model_section(value, where)
        else:
            kwargs[key] = check_type(value, kind, full, where)
    try:
        return cls(**kwargs)
    except NanoseekError as e:  # a dataclass that checks itself on construction
        raise NanoseekError(f"{where}: {e}") from None


def check_model_section(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise NanoseekError(f"{where}: config key 'model' must be a mapping (preset: tiny, hidden_size: ...)")
    hints = typing.get_type_hints(ModelConfig)
    out = {}
    for key, v in value.items():
        if key == "preset":
            out[key] = check_type(v, str, "model.preset", where)
        elif key in hints:
            out[key] = check_type(v, hints[key], f"model.{key}", where)
        else:
            raise NanoseekError(f"{where}: unknown config key 'model.{key}' (a ModelConfig field or 'preset')")
    return out


def check_type(value, kind, key: str, where: str):
    """`value` as type `kind`, or a NanoseekError naming `key`."""
    def fail():
        raise NanoseekError(f"{where}: config key '{key}' expects {type_name(kind)}, got {value!r:.60}")

    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None:
            if type(None) in options:
                return None
            fail()
        for option in options:
            if option is type(None):
                continue
            try:
                return check_type(value, option, key, where)
            except NanoseekError:
                continue
        fail()
    if kind is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            fail()
        (item,) = typing.get_args(kind) or (Any,)
        return [check_type(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            fail()
        return dict(value)
    if kind is bool:
        if not isinstance(value, bool):
            fail()
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail()
        return value
    if kind is float:
        if isinstance(value, bool):
            fail()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                fail()
        fail()
    if kind is str:
        if not isinstance(value, str):
            fail()
        return value
    fail()


def type_name(kind) -> str:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(type_name(k) for k in typing.get_args(kind))
    if kind is type(None):
        return "null"
    if typing.get_origin(kind) is list:
        return f"a list of {type_name(typing.get_args(kind)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}.get(
        kind, getattr(kind, "__name__", str(kind)))


def apply_override(cfg, item: str):
    """`key=value` with a dotted key; the value is read as YAML (numbers, lists, null)."""
    where = f"--set {item}"
    if "=" not in item:
        raise NanoseekError(f"{where}: expected key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    raw = dataclasses.asdict(cfg)
    parts = key.split(".")
    section = raw
    for i, part in enumerate(parts[:-1]):
        if not isinstance(section.get(part), dict):
            raise NanoseekError(f"{where}: unknown config key '{'.'.join(parts[:i + 1])}' (not a section)")
        section = section[part]
    leaf = parts[-1]
    if _is_string_key(type(cfg), parts) and value is not None and not isinstance(value, str):
        value = text  # --set data.tokenizer=123 means the path "123"
    if not (parts[0] == "model" and type(cfg) is TrainConfig) and leaf not in section:
        raise NanoseekError(f"{where}: unknown config key '{key}'")
    section[leaf] = value
    return from_dict(type(cfg), raw, where)


def _is_string_key(cls, parts: list[str]) -> bool:
    hints: Any = cls
    for part in parts:
        if part == "model" and hints is TrainConfig:
            return parts[-1] in ("preset", "topk_method", "scoring_func", "hidden_act", "model_type")
        if not dataclasses.is_dataclass(hints):
            return False
        h = typing.get_type_hints(hints)
        if part not in h:
            return False
        hints = h[part]
    return hints in (str, str | None)


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), encoding="utf-8")
