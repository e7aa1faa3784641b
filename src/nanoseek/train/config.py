"""Training configs: pydantic models read from YAML, with `--set key=value` overrides.

Every key is checked by the model: an unknown key (in any section) or a value of the wrong
type or out of range is a NanoseekError of one line that names the key and where it came
from ("configs/x.yaml: config key 'lr': must be at least 0, got -1"). No number may be
infinite or NaN (an `lr` of .inf trains a model of NaNs), the `model` section is checked as
the ModelConfig it makes, and a YAML file that gives a key twice is an error naming the key
and both lines (YAML itself keeps the last one silently). Nested sections use dotted
keys on the command line (`--set data.files=[a.jsonl] model.hidden_size=64`). The `model`
section takes a `preset` and any field of its config under its Hugging Face name: ModelConfig's
for a DeepSeek preset (`tiny`, `small`, ...), DenseConfig's for a dense student (`student`, the
R1-Distill layouts).
"""

from __future__ import annotations

import contextvars
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from typing_extensions import TypedDict  # pydantic reads TypedDicts from typing_extensions on Python 3.11

from nanoseek.config import PRESETS, ModelConfig, ModelConfigError, read_utf8
from nanoseek.dense import DENSE_PRESETS, DenseConfig
from nanoseek.errors import NanoseekError, dotted_location

PRECISIONS = ("fp32", "bf16", "fp8")
SCHEDULES = ("wsd", "cosine")
# Keys that may differ between a checkpoint and the run resuming it: extending a run, logging
# and checkpointing more or less often, or moving to other hardware (a checkpoint reloads on
# any number of ranks) does not change what was trained so far.
RESUMABLE_KEYS = (
    "steps",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "tensorboard",
    "progress",
    "device",
    "expert_parallel",
)


class ConfigKeyError(ValueError):
    """Raised by a model validator about one key (a check across keys): pydantic reports it with
    an empty location, so the key travels with the error."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


_depth: contextvars.ContextVar[int] = contextvars.ContextVar("config_depth", default=0)


class Section(BaseModel):
    """A config section: unknown keys are errors. Whether built in Python or by `parse`, a bad
    value is a NanoseekError of one line: the outermost section turns pydantic's errors into it
    (an inner one passes them up, so that the key is named in full: 'data.files')."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="wrap")
    @classmethod
    def _one_line(cls, data, handler, info):
        depth = _depth.set(_depth.get() + 1)
        context = info.context or {}
        try:
            section = handler(data)
            section.check()
            return section
        except ValidationError as e:
            if _depth.get() > 1:
                raise
            error = e.errors(include_url=False)
            more = f" (and {len(error) - 1} more)" if len(error) > 1 else ""
            raise NanoseekError(_origin(error_key(error[0]), context) + explain(error[0], cls) + more) from None
        except ConfigKeyError as e:
            if _depth.get() > 1:
                raise  # pydantic reports it at this section's place
            raise NanoseekError(f"{_origin(e.key, context)}config key '{e.key}': {e}") from None
        except NanoseekError as e:  # a check that asks elsewhere (is this device there?)
            if _depth.get() > 1 or not context.get("where"):
                raise
            raise NanoseekError(f"{context['where']}: {e}") from None
        finally:
            _depth.reset(depth)

    def check(self) -> None:
        """Checks across keys, once every key is valid: raise ConfigKeyError."""

    def to_dict(self) -> dict:
        """The config as plain JSON values, as config.yaml and trainer.json hold it."""
        return self.model_dump(mode="json")


def _model_section() -> type:
    """The `model` section: `preset` plus the fields of ModelConfig and DenseConfig, all optional,
    checked by type (whether a field belongs to the preset's kind is checked with the preset).
    It stays a plain dict (only the keys given), so config.yaml shows what was asked for."""
    fields: dict[str, Any] = {"preset": str}
    for kind in (ModelConfig, DenseConfig):
        hints = typing.get_type_hints(kind)
        for f in dataclasses.fields(kind):
            known = fields.get(f.name, hints[f.name])
            fields[f.name] = known if known == hints[f.name] else known | hints[f.name]
    section = TypedDict("ModelSection", fields, total=False)
    section.__pydantic_config__ = ConfigDict(extra="forbid", allow_inf_nan=False)
    return section


ModelSection = _model_section()


class DataConfig(Section):
    files: list[str] = []  # text / jsonl / parquet files or directories
    tokenizer: str | None = None  # directory with tokenizer.json; SFT falls back to init_from's
    text_field: str = "text"  # pretraining: the field of a jsonl/parquet record holding the document
    messages_field: str = "messages"  # SFT: the field holding the chat messages
    shuffle: bool = True


class TrainConfig(Section):
    # The model: a preset plus its config's fields (DeepSeek or dense), or a Hugging Face checkpoint to start from.
    model: ModelSection = Field(default_factory=lambda: {"preset": "tiny"})
    init_from: str | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    seq_len: int = Field(256, ge=1)
    document_mask: bool = False  # attend within each packed document only (V3 packs without a mask)
    batch_size: int = Field(16, ge=1)  # sequences per optimizer step, over all ranks
    micro_batch_size: int | None = Field(None, ge=1)  # sequences per forward on one rank; the rest is accumulation
    steps: int = Field(300, ge=1)
    seed: int = 0
    # AdamW and the learning-rate schedule (V3 section 4.2)
    lr: float = Field(3e-3, ge=0)
    min_lr: float = Field(3e-4, ge=0)
    # wsd: warm-up, constant, cosine decay, low tail (V3); cosine: warm-up then cosine
    schedule: Literal[SCHEDULES] = "wsd"
    warmup_steps: int = Field(20, ge=0)
    decay_fraction: float = Field(0.3, ge=0, le=1)  # wsd: share of the steps spent in the cosine decay
    tail_fraction: float = Field(0.0, ge=0, le=1)  # wsd: share of the steps held at min_lr at the end
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)
    # DeepSeek-V3 objectives: MTP weight lambda, aux-loss-free bias step gamma, balance-loss weight alpha
    mtp_lambda: float = Field(0.3, ge=0)
    bias_gamma: float = Field(0.001, ge=0)
    balance_alpha: float = Field(0.0001, ge=0)
    # SFT logit distillation: weight of the KL to the teacher's top-k log-probs on records that carry a
    # "teacher" trace (what `nanoseek distill` writes); 0 is plain SFT on the traces' tokens
    distill_kl: float = Field(0.0, ge=0)
    # Loss-spike guard: skip a batch whose loss is non-finite or above spike_factor x running mean;
    # after rollback_after spikes in a row, go back to the last checkpoint.
    spike_factor: float = Field(2.0, gt=1)
    spike_warmup: int = Field(10, ge=0)  # steps before the running mean is trusted
    rollback_after: int = Field(3, ge=1)
    # Running
    precision: Literal[PRECISIONS] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    expert_parallel: bool = False  # under torchrun: split routed experts across ranks
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    tensorboard: bool = True
    progress: bool = True

    def check(self) -> None:
        if self.min_lr > self.lr:
            raise ConfigKeyError("min_lr", f"{self.min_lr} is above lr {self.lr}")
        if self.decay_fraction + self.tail_fraction > 1:
            raise ConfigKeyError(
                "decay_fraction",
                f"decay_fraction {self.decay_fraction} and tail_fraction {self.tail_fraction} add up to more than 1",
            )
        try:  # the model section as the model it builds: a size of 0 is refused here, not at step 0
            self._model_config()
        except ModelConfigError as e:
            raise ConfigKeyError(f"model.{e.field}" if e.field else "model", e.detail) from None
        if self.dense_student():  # no FP8 linears, no experts: what the DeepSeek model has
            if self.precision == "fp8":
                raise ConfigKeyError(
                    "precision", "fp8 is for the DeepSeek model; a dense student trains in fp32 or bf16"
                )
            if self.expert_parallel:
                raise ConfigKeyError("expert_parallel", "a dense student has no experts to split across ranks")

    def dense_student(self) -> bool:
        """Whether the run trains a dense student: init_from a Qwen2/Llama directory, or a dense preset."""
        if self.init_from:
            from nanoseek.io.dense_hf import is_dense_checkpoint

            return is_dense_checkpoint(self.init_from)
        return self.model.get("preset") in DENSE_PRESETS

    def _model_config(self) -> ModelConfig | DenseConfig:
        name = self.model.get("preset", "tiny")
        overrides = {k: v for k, v in self.model.items() if k != "preset"}
        if name in DENSE_PRESETS:
            kind, preset, words = DenseConfig, DENSE_PRESETS[name], "dense"
        elif name in PRESETS:
            kind, preset, words = ModelConfig, PRESETS[name], "DeepSeek"
        else:
            raise ConfigKeyError(
                "model.preset",
                f"unknown preset '{name}' (DeepSeek: {', '.join(PRESETS)}; dense: {', '.join(DENSE_PRESETS)})",
            )
        fields = {f.name for f in dataclasses.fields(kind)}
        foreign = next((k for k in overrides if k not in fields), None)
        if foreign is not None:
            raise ConfigKeyError(f"model.{foreign}", f"not a field of the {words} preset '{name}' ({kind.__name__})")
        return kind(**{**preset, **overrides})

    def to_model_config(self) -> ModelConfig | DenseConfig:
        """The config of `model`: its preset (a ModelConfig, or a DenseConfig for a dense
        student) with the other keys replaced."""
        try:
            return self._model_config()
        except NanoseekError as e:
            raise NanoseekError(f"config section 'model': {e}") from None


# ---------------------------------------------------------------------------------------
# pydantic's errors as one line that names the key.
# ---------------------------------------------------------------------------------------
# What a value should be, by pydantic's error type; the others keep pydantic's own words.
EXPECTED = {
    "int_type": "expects an integer",
    "int_parsing": "expects an integer",
    "int_from_float": "expects an integer",
    "float_type": "expects a number",
    "float_parsing": "expects a number",
    "bool_type": "expects true or false",
    "bool_parsing": "expects true or false",
    "string_type": "expects a string",
    "list_type": "expects a list",
    "dict_type": "expects a mapping",
    "model_type": "expects a mapping",
    "model_attributes_type": "expects a mapping",
    "finite_number": "expects a finite number",
}
BOUNDS = {
    "greater_than_equal": ("ge", "must be at least"),
    "greater_than": ("gt", "must be above"),
    "less_than_equal": ("le", "must be at most"),
    "less_than": ("lt", "must be below"),
}


def _field(cls: type, key: str):
    """The field of section `cls` that config key `key` names: by its name, or by its alias (a key
    that is a Python keyword, such as `rollout.async`)."""
    fields = getattr(cls, "model_fields", {})
    return fields.get(key) or next((f for f in fields.values() if f.alias == key), None)


def _fields_at(cls: type, loc: tuple) -> list[str] | None:
    """The keys the section at `loc` accepts (None for the `model` section: too many to list)."""
    for part in loc:
        field = _field(cls, part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        cls = field.annotation
    if not hasattr(cls, "model_fields"):
        return None
    return sorted(f.alias or name for name, f in cls.model_fields.items())


def error_key(error: dict) -> str:
    exc = (error.get("ctx") or {}).get("error")
    loc = tuple(error["loc"]) + ((exc.key,) if isinstance(exc, ConfigKeyError) else ())
    return dotted_location(loc)


def explain(error: dict, cls: type) -> str:
    """One pydantic error as "config key 'KEY': what is wrong, got VALUE"."""
    key, kind, value = error_key(error), error["type"], error.get("input")
    got = f", got {value!r:.60}"
    if kind == "extra_forbidden":
        known = _fields_at(cls, tuple(error["loc"])[:-1])
        return f"unknown config key '{key}' (" + (
            f"known: {', '.join(known)})" if known is not None else "a ModelConfig or DenseConfig field, or 'preset')"
        )
    if kind == "missing":
        return f"config key '{key}' is required"
    if kind == "value_error":
        return f"config key '{key}': {error['ctx']['error']}"
    if kind in BOUNDS:
        name, words = BOUNDS[kind]
        return f"config key '{key}': {words} {error['ctx'][name]:g}{got}"
    if kind == "literal_error":
        return f"config key '{key}': must be one of {error['ctx']['expected'].replace(' or ', ', ')}{got}"
    if kind in EXPECTED:
        return f"config key '{key}' {EXPECTED[kind]}{got}"
    return f"config key '{key}': {error['msg'][0].lower()}{error['msg'][1:]}{got}"


def _origin(key: str, context: dict) -> str:
    """Where the value of `key` came from, as an error's prefix: the --set that gave it, or the file."""
    sources = context.get("sources") or {}
    origin = next(
        (s for k, s in sources.items() if key == k or key.startswith((k + ".", k + "[")) or k.startswith(key + ".")),
        context.get("where"),
    )
    return f"{origin}: " if origin else ""


# ---------------------------------------------------------------------------------------
# Reading YAML and --set overrides.
# ---------------------------------------------------------------------------------------
def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), cls=None):
    """A config (TrainConfig unless `cls` says otherwise) from a YAML file (or the defaults) with
    `key=value` overrides on top; checked once, when all of them are in."""
    cls = cls or TrainConfig
    raw: dict = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise NanoseekError(f"{path}: config file not found")
        try:
            loaded = read_yaml(read_utf8(path))
        except yaml.YAMLError as e:
            raise NanoseekError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        except DuplicateKeyError as e:
            raise NanoseekError(f"{path}: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise NanoseekError(f"{path}: expected a mapping of keys to values at the top level")
        raw = loaded or {}
    sources: dict[str, str] = {}  # dotted key -> the --set that gave it
    for item in overrides:
        key = apply_override(raw, item, cls)
        sources[key] = f"--set {item}"
    return parse(cls, raw, where, sources)


class DuplicateKeyError(ValueError):
    """A YAML mapping that gives one key twice: `loc` is its place from the document's top."""

    def __init__(self, loc: tuple, first: int, second: int):
        super().__init__(f"duplicate key '{dotted_location(loc)}' (lines {first} and {second})")
        self.loc = loc


def read_yaml(text: str):
    """YAML as yaml.safe_load reads it, but a mapping that gives a key twice is a DuplicateKeyError
    naming the key (dotted, as --set spells it) and both lines, not its last value in silence."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _no_duplicate_keys(node, (), set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _no_duplicate_keys(node, loc: tuple, seen: set[int]) -> None:
    if id(node) in seen:  # an alias: checked where its anchor is
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[tuple, int] = {}
        for key, value in node.value:
            if key.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then a key is YAML's way to override
                continue
            if isinstance(key, yaml.ScalarNode):
                here = (key.tag, key.value)
                if here in lines:
                    raise DuplicateKeyError((*loc, key.value), lines[here], key.start_mark.line + 1)
                lines[here] = key.start_mark.line + 1
                _no_duplicate_keys(value, (*loc, key.value), seen)
            else:
                _no_duplicate_keys(value, loc, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _no_duplicate_keys(item, (*loc, i), seen)


def parse(cls, raw: dict, where: str, sources: dict[str, str] | None = None):
    """`cls` from `raw`; an error names the key and where its value came from (`sources`)."""
    return cls.model_validate(raw, context={"where": where, "sources": sources or {}})


def apply_override(raw: dict, item: str, cls) -> str:
    """Put `key=value` (a dotted key; the value read as YAML: numbers, lists, null) into `raw`;
    returns the key."""
    if "=" not in item:
        raise NanoseekError(f"--set {item}: expected key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = read_yaml(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    except DuplicateKeyError as e:  # one line: no line numbers, the key from the config's top
        raise NanoseekError(f"--set {item}: duplicate key '{dotted_location((key, *e.loc))}'") from None
    parts = key.split(".")
    for i in range(1, len(parts)):
        if _annotation(cls, parts[:i]) is not None and not _is_mapping(_annotation(cls, parts[:i])):
            raise NanoseekError(f"--set {item}: config key '{'.'.join(parts[:i])}' is not a section")
    kind = _annotation(cls, parts)
    union = typing.get_origin(kind) in (typing.Union, types.UnionType)
    if value is not None and not isinstance(value, str) and (kind is str or (union and str in typing.get_args(kind))):
        value = text  # --set data.tokenizer=123 means the path "123" (a string, or a string or null)
    section = raw
    for part in parts[:-1]:
        if not isinstance(section.get(part), dict):
            section[part] = {}
        section = section[part]
    section[parts[-1]] = value
    return key


def _is_section(kind) -> bool:
    return isinstance(kind, type) and issubclass(kind, BaseModel)


def _is_mapping(kind) -> bool:
    """A section, the model section, or a dict (GRPO's task_options): what a dotted key may enter."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return any(_is_mapping(k) for k in typing.get_args(kind))
    return _is_section(kind) or kind is ModelSection or kind is dict or typing.get_origin(kind) is dict


def _annotation(cls, parts: list[str]):
    """The type of the dotted key `parts` in `cls` (None for a key it does not have)."""
    kind: Any = cls
    for part in parts:
        if _is_section(kind):
            field = _field(kind, part)
            kind = field.annotation if field else None
        elif kind is ModelSection:
            kind = typing.get_type_hints(ModelSection).get(part)
        else:
            return None
    return kind


def save_config(cfg: Section, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
