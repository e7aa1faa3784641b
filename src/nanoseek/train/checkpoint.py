"""Checkpoints that survive crashes.

A checkpoint is a directory `OUT/checkpoints/step-00000100/`. Written by one process, it holds
- `model.safetensors`: the weights and buffers, routing biases among them;
- `optimizer.safetensors`: AdamW's moments and step count per parameter (`NAME.exp_avg`, ...);
Written by many ranks (torchrun), it holds instead the files of `torch.distributed.checkpoint`
(DCP): each rank writes its own shards (`__RANK_0.distcp`, read back with weights_only) of the
same tensors, under `model.NAME` and `optimizer.NAME.exp_avg`, and `.metadata` says where each piece
lies; nothing is gathered on one rank, and DCP reassembles them on any number of ranks.
Both kinds hold `trainer.json`: the step, the config it was trained with, the data position,
the RNG states, the loss-spike guard and the SHA-256 of every other file (checked before DCP
unpickles its `.metadata`).
It is written under a temporary name, every file fsynced, and renamed into place only when
complete: a crash mid-write leaves the previous checkpoints as they were. The last K are kept.
Nothing non-finite is written (a diverged run's NaN weights would replace the good ones that a
rollback needs), and a write that fails for the disk's sake (full, over quota) is a one-line
NanoseekError naming the checkpoint, with the partial directory removed.
Reading one checks everything before anything is changed: a corrupt or mismatched checkpoint
is a NanoseekError that names the file and what is wrong.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from nanoseek import storage
from nanoseek.errors import NanoseekError

FORMAT = 1
NAME = re.compile(r"^step-(\d{8})$")
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors")


@dataclass
class Checkpoint:
    path: Path
    step: int
    model: dict[str, torch.Tensor]  # full tensors; empty in a sharded checkpoint (read them with DCP)
    optimizer: dict[str, torch.Tensor]
    state: dict  # trainer.json
    sharded: bool = False  # written by many ranks through torch.distributed.checkpoint
    shapes: dict[str, tuple[int, ...]] | None = None  # of the model's tensors

    def __post_init__(self):
        if self.shapes is None:
            self.shapes = {name: tuple(t.shape) for name, t in self.model.items()}


def checkpoints_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def list_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints in OUT, oldest first (temporary directories are not among them)."""
    d = checkpoints_dir(out)
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if p.is_dir() and NAME.match(p.name)), key=lambda p: p.name)


def find_resume(out: str | Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: `resume` (a directory, or 'latest'), else OUT's newest."""
    if resume is None or resume == "latest":
        found = list_checkpoints(out)
        if resume == "latest" and not found:
            raise NanoseekError(f"--resume: no checkpoint in {checkpoints_dir(out)}")
        return found[-1] if found else None
    return Path(resume)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> str:
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a failed write() names no file: say which one
        if e.filename is None:
            e.filename = str(path)
        raise
    return hashlib.sha256(data).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _fresh(tmp: Path) -> Path:
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def save_checkpoint(
    out: str | Path,
    step: int,
    model_sd: dict[str, torch.Tensor],
    optim_sd: dict[str, torch.Tensor],
    state: dict,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically and drop all but the newest `keep` (one process)."""
    root = checkpoints_dir(out)
    storage.check_finite({**model_sd, **{f"optimizer.{k}": v for k, v in optim_sd.items()}}, root / _name(step))
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    try:
        _fresh(tmp)
        files = {
            "model.safetensors": _write(tmp / "model.safetensors", save_safetensors(model_sd)),
            "optimizer.safetensors": _write(tmp / "optimizer.safetensors", save_safetensors(optim_sd)),
        }
        return _publish(out, tmp, step, {**state, "files": files}, keep)
    except BaseException as e:
        error = _write_error(e, out, step)
        shutil.rmtree(tmp, ignore_errors=True)
        if error is None:
            raise
        raise error from None


def _name(step: int) -> str:
    return f"step-{step:08d}"


def _write_error(e: BaseException, out, step: int, directory: Path | None = None) -> NanoseekError | None:
    """The one-line error for a checkpoint write that failed for the disk's sake; None for other failures.
    Called before the partial directory is removed (which frees the space `directory`'s check reads)."""
    if isinstance(e, (NanoseekError, KeyboardInterrupt, SystemExit, GeneratorExit)):
        return None
    reason = storage.disk_reason(e, directory)
    if reason is None:
        return None
    file = storage.failed_file(e)
    writing = f" writing {Path(file).name}" if file else ""
    done = list_checkpoints(out)
    kept = f"{done[-1].name} is the newest checkpoint, intact" if done else "there is no earlier checkpoint"
    return NanoseekError(
        f"{checkpoints_dir(out) / _name(step)}: checkpoint not written: {reason}{writing}; "
        f"the partial write was removed and {kept}"
    )


def save_sharded_checkpoint(
    out: str | Path, step: int, tensors: dict[str, torch.Tensor], state: dict, ctx, keep: int = 2
) -> Path:
    """Write checkpoint `step` from every rank at once (collective): each rank writes the shards
    it holds of `tensors` (DTensors, or plain tensors that only it has or that all ranks hold
    alike) through torch.distributed.checkpoint; rank 0 then records the files' hashes and
    `state`, and renames the directory into place."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    root = checkpoints_dir(out)
    tmp = root / f".tmp-step-{step:08d}"  # one name for all ranks
    bad = storage.nonfinite_names(tensors)  # this rank's shards; every rank learns whether any has one
    if ctx.all_reduce(torch.tensor([float(len(bad))], device=ctx.device)).item():
        what = f"{bad[0]} holds" if bad else "tensors of another rank hold"
        raise NanoseekError(f"{root / _name(step)}: not written: {what} NaN or inf (the run diverged)")
    try:
        if ctx.is_main:
            _fresh(tmp)
        ctx.barrier()
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp))  # a failure on one rank raises on all
        ctx.barrier()  # every rank's files are written and fsynced, and rank 0's .metadata
        mine = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.name.startswith(f"__{ctx.rank}_")}
        hashes = [None] * ctx.world_size if ctx.is_main else None
        dist.gather_object(mine, hashes, dst=0)
        final = None
        if ctx.is_main:
            files = {name: h for part in hashes for name, h in part.items()}
            files[".metadata"] = _sha256(tmp / ".metadata")
            final = _publish(out, tmp, step, {**state, "files": files, "sharded": True}, keep)
        ctx.barrier()
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        error = _write_error(e, out, step, directory=root)
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is None:
            raise
        raise error from None
    return final or root / _name(step)


def _publish(out: str | Path, tmp: Path, step: int, state: dict, keep: int) -> Path:
    """Write trainer.json into the complete temporary directory `tmp` and rename it into place."""
    root = checkpoints_dir(out)
    final = root / f"step-{step:08d}"
    for name in state["files"]:
        _fsync(tmp / name)
    record = {"format": FORMAT, "step": step, **state}
    _write(tmp / "trainer.json", (json.dumps(record, indent=1) + "\n").encode())
    _fsync(tmp)
    storage.swap(tmp, final)  # the same step written again (after a rollback) replaces the old one
    _fsync(root)
    for stale in list_checkpoints(out)[:-keep]:
        if stale != final:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def remove_partial(out: str | Path) -> None:
    """Delete temporary directories left by a crash mid-write."""
    root = checkpoints_dir(out)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify a checkpoint directory; raise NanoseekError if it is incomplete or corrupt."""
    path = Path(path)
    if not path.is_dir():
        raise NanoseekError(f"{path}: no such checkpoint directory")
    meta_file = path / "trainer.json"
    if not meta_file.is_file():
        raise NanoseekError(f"{path}: not a complete checkpoint (trainer.json is missing)")
    try:
        state = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanoseekError(f"{meta_file}: corrupt checkpoint metadata ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("files"), dict):
        raise NanoseekError(f"{meta_file}: not a nanoseek checkpoint of format {FORMAT}")
    if state.get("sharded"):
        return _read_sharded(path, state)
    tensors = {}
    for name in TENSOR_FILES:
        f = path / name
        if not f.is_file():
            raise NanoseekError(f"{f}: missing from the checkpoint")
        data = f.read_bytes()
        if hashlib.sha256(data).hexdigest() != state["files"].get(name):
            raise NanoseekError(f"{f}: corrupt checkpoint (SHA-256 differs from the one recorded in trainer.json)")
        try:
            tensors[name] = load_safetensors(data)
        except (SafetensorError, ValueError) as e:
            raise NanoseekError(f"{f}: unreadable safetensors ({e})") from None
    return Checkpoint(path, int(state["step"]), tensors["model.safetensors"], tensors["optimizer.safetensors"], state)


def _read_sharded(path: Path, state: dict) -> Checkpoint:
    """Verify a DCP checkpoint's files against trainer.json; the tensors are read by `load_sharded`."""
    from torch.distributed.checkpoint import FileSystemReader, TensorStorageMetadata

    if ".metadata" not in state["files"]:
        raise NanoseekError(f"{path}/trainer.json: a sharded checkpoint without .metadata")
    for name, digest in state["files"].items():
        f = path / name
        if not f.is_file():
            raise NanoseekError(f"{f}: missing from the checkpoint")
        if _sha256(f) != digest:
            raise NanoseekError(f"{f}: corrupt checkpoint (SHA-256 differs from the one recorded in trainer.json)")
    metadata = FileSystemReader(path).read_metadata().state_dict_metadata
    shapes = {
        name[len("model.") :]: tuple(m.size)
        for name, m in metadata.items()
        if name.startswith("model.") and isinstance(m, TensorStorageMetadata)
    }
    return Checkpoint(path, int(state["step"]), {}, {}, state, sharded=True, shapes=shapes)


def load_sharded(c: Checkpoint, tensors: dict[str, torch.Tensor]) -> None:
    """Fill `tensors` (this rank's DTensor shards and plain tensors, under the names they were
    saved with) in place from the sharded checkpoint `c`; each rank reads only what it holds.
    Works in a single process too (full tensors)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # DCP warns that one process reads alone: that is what is meant
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(tensors, storage_reader=dcp.FileSystemReader(c.path), no_dist=not dist.is_initialized())


def saved_names(c: Checkpoint) -> set[str]:
    """The names of the tensors a sharded checkpoint holds."""
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(c.path).read_metadata().state_dict_metadata)


def jsonable(d: dict) -> dict:
    """`d` as it reads back from trainer.json (tuples become lists), so that a saved config
    compares equal to the one resuming it."""
    return json.loads(json.dumps(d, default=str))


def config_defaults(cls) -> dict:
    """A pydantic config class's default values as JSON, the way `to_dict` writes them (fields
    without a default left out)."""
    out = {}
    for name, field in cls.model_fields.items():
        if field.is_required():
            continue
        value = field.get_default(call_default_factory=True)
        out[name] = (
            value.model_dump(mode="json")
            if hasattr(value, "model_dump")
            else json.loads(json.dumps(value, default=str))
        )
    return out


def check_compatible(
    ckpt: Checkpoint,
    config: dict,
    model_config: dict,
    resumable: tuple[str, ...],
    shapes: dict[str, tuple[int, ...]],
    defaults: dict | None = None,
) -> None:
    """Raise if the checkpoint was written by another configuration or for another model. A run
    option the checkpoint does not record (written before the option existed) counts as equal when
    this run leaves it at its default in `defaults`, what the older code did."""
    _absent = object()

    def differences(saved: dict, now: dict, skip=(), prefix="", default: dict | None = None) -> list[str]:
        out = []
        default = default or {}
        for key in sorted(set(saved) | set(now)):
            if key in skip:
                continue
            a, b = saved.get(key, _absent), now.get(key, _absent)
            if a is _absent and key in default and b == default[key]:
                continue
            if isinstance(a, dict) and isinstance(b, dict):
                sub = default.get(key) if isinstance(default.get(key), dict) else None
                out += differences(a, b, (), f"{prefix}{key}.", sub)
            elif a != b:
                shown = ["<absent>" if v is _absent else v for v in (a, b)]
                out.append(f"{prefix}{key} {shown[0]!r} (checkpoint) vs {shown[1]!r} (now)")
        return out

    diff = differences(ckpt.state.get("model_config", {}), model_config, prefix="model.")
    diff += differences(ckpt.state.get("config", {}), config, skip=resumable, default=defaults)
    if diff:
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        raise NanoseekError(f"{ckpt.path}: checkpoint was written with a different config: {'; '.join(diff[:3])}{more}")
    where = f"{ckpt.path}/{'.metadata' if ckpt.sharded else 'model.safetensors'}"
    missing = sorted(set(shapes) - set(ckpt.shapes))
    extra = sorted(set(ckpt.shapes) - set(shapes))
    if missing or extra:
        raise NanoseekError(f"{where}: tensors do not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, shape in shapes.items():
        if tuple(ckpt.shapes[name]) != tuple(shape):
            raise NanoseekError(f"{where}: {name} has shape {list(ckpt.shapes[name])}, the model expects {list(shape)}")


# ---------------------------------------------------------------------------------------
# Random number generator states as JSON.
# ---------------------------------------------------------------------------------------
def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    state = {
        "python": [version, list(internal), gauss],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))

    def tensor(s):
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensor(s) for s in state["cuda"]])
