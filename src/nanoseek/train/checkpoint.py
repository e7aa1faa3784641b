"""Checkpoints that survive crashes.

A checkpoint is a directory `OUT/checkpoints/step-00000100/` holding
- `model.safetensors`: the weights and buffers, routing biases among them;
- `optimizer.safetensors`: AdamW's moments and step count per parameter (`NAME.exp_avg`, ...);
- `trainer.json`: the step, the config it was trained with, the data position, the RNG states,
  the loss-spike guard and the SHA-256 of both tensor files. No pickle anywhere.
It is written under a temporary name, every file fsynced, and renamed into place only when
complete: a crash mid-write leaves the previous checkpoints as they were. The last K are kept.
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
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from nanoseek.errors import NanoseekError

FORMAT = 1
NAME = re.compile(r"^step-(\d{8})$")
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors")


@dataclass
class Checkpoint:
    path: Path
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    state: dict  # trainer.json


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
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(out: str | Path, step: int, model_sd: dict[str, torch.Tensor],
                    optim_sd: dict[str, torch.Tensor], state: dict, keep: int = 2) -> Path:
    """Write checkpoint `step` atomically and drop all but the newest `keep`."""
    root = checkpoints_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files = {
        "model.safetensors": _write(tmp / "model.safetensors", save_safetensors(model_sd)),
        "optimizer.safetensors": _write(tmp / "optimizer.safetensors", save_safetensors(optim_sd)),
    }
    record = {"format": FORMAT, "step": step, **state, "files": files}
    _write(tmp / "trainer.json", (json.dumps(record, indent=1) + "\n").encode())
    _fsync(tmp)
    if final.exists():  # the same step written again (after a rollback): swap it out
        old = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
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
    return Checkpoint(path, int(state["step"]), tensors["model.safetensors"], tensors["optimizer.safetensors"],
                      state)


def jsonable(d: dict) -> dict:
    """`d` as it reads back from trainer.json (tuples become lists), so that a saved config
    compares equal to the one resuming it."""
    return json.loads(json.dumps(d, default=str))


def check_compatible(ckpt: Checkpoint, config: dict, model_config: dict, resumable: tuple[str, ...],
                     shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise if the checkpoint was written by another configuration or for another model."""
    def differences(saved: dict, now: dict, skip=(), prefix="") -> list[str]:
        out = []
        for key in sorted(set(saved) | set(now)):
            if key in skip:
                continue
            a, b = saved.get(key, "<absent>"), now.get(key, "<absent>")
            if isinstance(a, dict) and isinstance(b, dict):
                out += differences(a, b, (), f"{prefix}{key}.")
            elif a != b:
                out.append(f"{prefix}{key} {a!r} (checkpoint) vs {b!r} (now)")
        return out

    diff = differences(ckpt.state.get("model_config", {}), model_config, prefix="model.")
    diff += differences(ckpt.state.get("config", {}), config, skip=resumable)
    if diff:
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        raise NanoseekError(f"{ckpt.path}: checkpoint was written with a different config: "
                            f"{'; '.join(diff[:3])}{more}")
    missing = sorted(set(shapes) - set(ckpt.model))
    extra = sorted(set(ckpt.model) - set(shapes))
    if missing or extra:
        raise NanoseekError(f"{ckpt.path}/model.safetensors: tensors do not match the model "
                            f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for name, shape in shapes.items():
        if tuple(ckpt.model[name].shape) != tuple(shape):
            raise NanoseekError(f"{ckpt.path}/model.safetensors: {name} has shape {list(ckpt.model[name].shape)}, "
                                f"the model expects {list(shape)}")


# ---------------------------------------------------------------------------------------
# Random number generator states as JSON.
# ---------------------------------------------------------------------------------------
def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss],
             "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
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
