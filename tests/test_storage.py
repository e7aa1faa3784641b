"""storage: nothing non-finite is written, and a write that fails for the disk's sake is one line
naming the path, with the partial write removed and what was there before intact."""

import errno
import os

import pytest
import torch

from nanoseek import storage
from nanoseek.errors import NanoseekError

from train_support import snapshot


def enospc(path="/somewhere/file") -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_nonfinite_names_finds_nan_and_inf_in_any_float_dtype():
    tensors = {
        "ok": torch.ones(3),
        "nan": torch.tensor([1.0, float("nan")]),
        "inf.bf16": torch.tensor([float("-inf")], dtype=torch.bfloat16),
        "fp8": torch.tensor([float("nan")]).to(torch.float8_e4m3fn),
        "ints": torch.arange(3),  # integers are never checked
        "empty": torch.empty(0),
        "step": 3,  # not a tensor
    }
    assert storage.nonfinite_names(tensors) == ["nan", "inf.bf16", "fp8"]
    assert storage.nonfinite_names({"a": torch.zeros(2), "b": torch.ones(2, dtype=torch.float16)}) == []


def test_check_finite_names_the_tensor_and_the_path(tmp_path):
    storage.check_finite({"w": torch.ones(2)}, tmp_path / "ckpt")  # finite: nothing happens
    with pytest.raises(NanoseekError) as e:
        storage.check_finite({"w": torch.ones(2), "layers.0.wq": torch.tensor([float("inf")])}, tmp_path / "ckpt")
    assert str(e.value).startswith(f"{tmp_path / 'ckpt'}: not written: layers.0.wq hold")
    with pytest.raises(NanoseekError, match=r": not written: a and 1 more hold NaN or inf"):
        storage.check_finite({"a": torch.tensor([float("nan")]), "b": torch.tensor([float("nan")])}, "x")


def test_disk_reason_reads_every_shape_of_a_full_disk():
    assert storage.disk_reason(enospc()) == "no space left on device"
    assert storage.disk_reason(OSError(errno.EDQUOT, "Disk quota exceeded")) == "disk quota exceeded"
    # safetensors' Rust io::Error arrives as text only
    assert storage.disk_reason(Exception("Error while serializing: IoError(No space left on device (os error 28))"))
    assert storage.disk_reason(RuntimeError("os error 28")) == "no space left on device"
    # torch.save: a RuntimeError raised while handling (or from) the OSError
    try:
        try:
            raise enospc()
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file")  # noqa: B904 (implicit chaining, as torch.save does)
    except RuntimeError as e:
        assert storage.disk_reason(e) == "no space left on device"
    caused = ValueError("wrapped")
    caused.__cause__ = enospc()
    assert storage.disk_reason(caused) == "no space left on device"
    # DCP's CheckpointException: each rank's failure, as (exception, traceback) or the exception
    failures = Exception("rank 1 failed")
    failures.failures = {1: (enospc(), "traceback")}
    assert storage.disk_reason(failures) == "no space left on device"
    # not the disk's fault
    assert storage.disk_reason(ValueError("bad shape")) is None
    assert storage.disk_reason(KeyError("w")) is None


def test_disk_reason_of_an_error_without_its_oserror_reads_the_free_space(tmp_path, monkeypatch):
    assert storage.disk_reason(Exception("rank 3 failed"), tmp_path) is None  # this disk has room
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    assert storage.disk_reason(Exception("rank 3 failed"), tmp_path) == "no space left on device"


def test_failed_file_is_the_file_the_oserror_names():
    e = RuntimeError("writing failed")
    e.__context__ = enospc("/out/hf/model.safetensors")
    assert storage.failed_file(e) == "/out/hf/model.safetensors"
    assert storage.failed_file(ValueError()) is None


def test_disk_errors_is_one_line_naming_the_file():
    with pytest.raises(NanoseekError) as e:
        with storage.disk_errors("/out"):
            raise enospc("/out/metrics.jsonl")
    assert str(e.value) == "/out/metrics.jsonl: no space left on device"
    with pytest.raises(NanoseekError, match="^/out: disk quota exceeded$"):
        with storage.disk_errors("/out"):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    with pytest.raises(PermissionError):  # other OSErrors are not the disk's: they pass as they are
        with storage.disk_errors("/out"):
            raise PermissionError(errno.EACCES, "Permission denied", "/out/x")


def _old_export(root):
    old = root / "hf"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"the old weights")
    (old / "config.json").write_text("{}")
    return old


def test_replacing_directory_replaces_in_one_piece(tmp_path):
    _old_export(tmp_path)
    with storage.replacing_directory(tmp_path / "hf") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-hf-")
        (tmp / "model.safetensors").write_bytes(b"new")
    assert snapshot(tmp_path) == {"hf/model.safetensors": b"new"}
    with storage.replacing_directory(tmp_path / "fresh") as tmp:  # nothing there before
        (tmp / "a").write_text("a")
    assert (tmp_path / "fresh" / "a").read_text() == "a"


@pytest.mark.parametrize(
    "failure",
    [
        lambda tmp: enospc(tmp / "model.safetensors"),
        lambda tmp: Exception("Error while serializing: IoError(No space left on device (os error 28))"),
    ],
)
def test_replacing_directory_on_a_full_disk_keeps_the_old_directory(tmp_path, failure):
    _old_export(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(NanoseekError) as e:
        with storage.replacing_directory(tmp_path / "hf") as tmp:
            (tmp / "config.json").write_text('{"new": 1}')
            (tmp / "model.safetensors").write_bytes(b"half of the new")
            raise failure(tmp)
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'hf'}: not written: no space left on device")
    assert "\n" not in message and "intact" in message
    assert snapshot(tmp_path) == before  # byte for byte, and no .tmp- sibling
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_replacing_directory_passes_other_errors_and_still_cleans_up(tmp_path):
    _old_export(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(KeyError):
        with storage.replacing_directory(tmp_path / "hf") as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise KeyError("a bug, not the disk")
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_swap_puts_the_old_directory_back_when_the_rename_fails(tmp_path, monkeypatch):
    old = _old_export(tmp_path)
    new = tmp_path / ".tmp-hf"
    new.mkdir()
    (new / "model.safetensors").write_bytes(b"new")
    before = snapshot(old)
    real = os.rename

    def rename(src, dst):
        if str(src) == str(new):
            raise enospc(dst)
        real(src, dst)

    monkeypatch.setattr(storage.os, "rename", rename)
    with pytest.raises(OSError):
        storage.swap(new, old)
    assert snapshot(old) == before and not list(tmp_path.glob(".old-*"))
