"""Writing tensors to disk without harm: nothing non-finite is written, and a write that fails
(a full disk above all) is a one-line NanoseekError naming the path, with its partial files removed.

A diverged run's weights are NaN: written as a checkpoint they would replace the good ones that
a rollback or a resume needs, and written as a model they load and answer garbage. A full disk
shows up in many shapes (an OSError, safetensors' SafetensorError, torch.save's RuntimeError
with the OSError as its context, DCP's CheckpointException from another rank): `disk_reason`
reads them all.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from nanoseek.errors import NanoseekError

FULL = "no space left on device"
REASONS = {errno.ENOSPC: FULL, errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system"}


def nonfinite_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold a NaN or an inf (this rank's shard of a
    DTensor). One flag per tensor, read back once per device: a sync per device, not per tensor."""
    flags: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        if not torch.is_tensor(t):
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        if not t.is_floating_point() or t.numel() == 0:
            continue
        if t.element_size() == 1:  # FP8 has no isfinite kernel; its values are few
            t = t.float()
        flags.setdefault(t.device, []).append((name, torch.isfinite(t).all()))
    bad = []
    for pairs in flags.values():
        ok = torch.stack([f for _, f in pairs]).tolist()
        bad += [name for (name, _), good in zip(pairs, ok) if not good]
    return bad


def check_finite(tensors: dict[str, torch.Tensor], where: str | Path) -> None:
    """Raise before anything is written if a tensor holds NaN or inf."""
    bad = nonfinite_names(tensors)
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise NanoseekError(
            f"{where}: not written: {bad[0]}{more} hold NaN or inf (the run diverged; lower the learning rate)"
        )


def _chain(e: BaseException) -> Iterator[BaseException]:
    """e, what caused it, and for DCP's CheckpointException every rank's failure."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [x.__cause__, x.__context__]
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]


def disk_reason(e: BaseException, directory: str | Path | None = None) -> str | None:
    """Why a write failed, when the disk is to blame ('no space left on device', ...), else None.
    A failure that lost its OSError on the way (another rank's, pickled) counts as a full disk
    when `directory`'s file system has less than 1 MiB free."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno is not None:
            return REASONS.get(x.errno, x.strerror or str(x))
        if "os error 28" in str(x) or "No space left on device" in str(x):  # safetensors' Rust io::Error
            return FULL
    if directory is not None:
        try:
            if shutil.disk_usage(directory).free < 1 << 20:
                return FULL
        except OSError:
            pass
    return None


def failed_file(e: BaseException) -> str | None:
    """The file an OSError in e's chain names, if any."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.filename:
            return os.fspath(x.filename)
    return None


@contextmanager
def disk_errors(where: str | Path) -> Iterator[None]:
    """A full disk or quota (an OSError) inside the block becomes a NanoseekError naming the file, or `where`."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise NanoseekError(f"{e.filename or where}: {REASONS[e.errno]}") from None


def swap(tmp: Path, final: Path) -> None:
    """Rename the complete directory `tmp` to `final`, replacing what is there (put back if the rename fails)."""
    if not final.exists():
        os.rename(tmp, final)
        return
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def replacing_directory(final: str | Path) -> Iterator[Path]:
    """Write a directory in one piece: the block writes into a fresh temporary sibling, which then
    replaces `final` by renames. If the block fails, the temporary directory is removed and `final`
    is as it was; a failure of the disk's is a NanoseekError naming `final`."""
    final = Path(final)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        yield tmp
        swap(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = None if isinstance(e, (NanoseekError, KeyboardInterrupt, SystemExit)) else disk_reason(e)
        if reason is None:
            raise
        raise NanoseekError(
            f"{final}: not written: {reason} (the partial write was removed; what was there before is intact)"
        ) from None
