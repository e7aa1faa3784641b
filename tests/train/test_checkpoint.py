"""Checkpoints: atomic writes, exact resume after SIGKILL, and clean failure on a bad checkpoint."""

import errno
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from nanoseek.cli import main
from nanoseek.errors import NanoseekError
from nanoseek.train import checkpoint as ckpt

from train_support import (
    FAST,
    SMALL_MODEL,
    data_args,
    env_one_thread,
    losses,
    make_data,
    nanoseek_cmd,
    run_cli,
    snapshot,
    train_here,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def test_save_is_atomic_and_keeps_last_k(tmp_path):
    state = {"config": {}, "model_config": {}}
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, {}, state, keep=2)
    # A crash mid-write leaves a temporary directory: never listed, removed on the next start.
    partial = ckpt.checkpoints_dir(tmp_path) / ".tmp-step-00000004-123"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a file")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    c = ckpt.read_checkpoint(ckpt.list_checkpoints(tmp_path)[-1])
    assert c.step == 3 and c.model["w"].tolist() == [3.0, 3.0]
    ckpt.remove_partial(tmp_path)
    assert not partial.exists()


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    json.dumps(state)  # plain JSON, no pickle
    a = torch.rand(3)
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(3), a)


def test_sigkill_then_same_command_resumes_bit_for_bit(tmp_path, data):
    overrides = [*data_args(data), *SMALL_MODEL, *FAST, "steps=16", "checkpoint_every=6"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    train_here(whole, overrides)  # uninterrupted, in this process (one thread, like the subprocesses)

    args = ["pretrain", "--out", str(killed), "--set", *overrides]
    proc = subprocess.Popen(
        nanoseek_cmd(*args), env=env_one_thread(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    first = killed / "checkpoints" / "step-00000006"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "hf").exists()

    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    assert losses(killed) == losses(whole)  # every logged step, bit for bit
    assert len(losses(whole)) == 16


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data):
    """A short finished run with checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("finished")
    train_here(out, [*data_args(data), *SMALL_MODEL, *FAST, "steps=6", "checkpoint_every=3"])
    return out


def _damage_model_file(out):
    f = ckpt.list_checkpoints(out)[-1] / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 0xFF
    f.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "damage, extra, message",
    [
        (_damage_model_file, [], "corrupt checkpoint"),
        (
            lambda out: (ckpt.list_checkpoints(out)[-1] / "trainer.json").write_text('{"format": 1, '),
            [],
            "corrupt checkpoint metadata",
        ),
        (lambda out: (ckpt.list_checkpoints(out)[-1] / "optimizer.safetensors").unlink(), [], "missing"),
        (None, ["model.hidden_size=32"], "different config: model.hidden_size 64 (checkpoint) vs 32"),
        (None, ["lr=0.01"], "different config: lr"),
    ],
)
def test_bad_checkpoint_fails_cleanly_and_touches_nothing(tmp_path, data, finished, damage, extra, message, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    if damage:
        damage(out)
    before = snapshot(out)
    code = main(
        [
            "pretrain",
            "--out",
            str(out),
            "--resume",
            "--set",
            *data_args(data),
            *SMALL_MODEL,
            *FAST,
            "steps=9",
            "checkpoint_every=3",
            *extra,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1
    assert snapshot(out) == before


def test_resume_with_nothing_to_resume(tmp_path, data, capsys):
    code = main(["pretrain", "--out", str(tmp_path / "empty"), "--resume", "--set", *data_args(data), *FAST])
    assert code == 2 and "no checkpoint" in capsys.readouterr().err


def test_read_checkpoint_errors(tmp_path):
    with pytest.raises(NanoseekError, match="no such checkpoint"):
        ckpt.read_checkpoint(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(NanoseekError, match="trainer.json is missing"):
        ckpt.read_checkpoint(tmp_path / "half")


# ---- nothing non-finite, and a full disk ---------------------------------------------------
STATE = {"config": {}, "model_config": {}}


def _save(out, step, w=1.0, **kw):
    return ckpt.save_checkpoint(out, step, {"w": torch.full((2,), w)}, {"state.0.exp_avg": torch.zeros(2)}, STATE, **kw)


def _entries(out):
    return sorted(p.name for p in ckpt.checkpoints_dir(out).iterdir())


@pytest.mark.parametrize(
    "model_sd, optim_sd, named",
    [
        ({"w": torch.tensor([1.0, float("nan")])}, {"state.0.exp_avg": torch.zeros(2)}, "w"),
        ({"w": torch.ones(2)}, {"state.0.exp_avg": torch.tensor([float("inf"), 0.0])}, "optimizer.state.0.exp_avg"),
    ],
)
def test_save_refuses_nonfinite_tensors_and_writes_nothing(tmp_path, model_sd, optim_sd, named):
    _save(tmp_path, 1)
    before = snapshot(tmp_path)
    with pytest.raises(NanoseekError) as e:
        ckpt.save_checkpoint(tmp_path, 2, model_sd, optim_sd, STATE)
    assert str(e.value).startswith(f"{ckpt.checkpoints_dir(tmp_path) / 'step-00000002'}: not written: {named} hold")
    assert snapshot(tmp_path) == before and _entries(tmp_path) == ["step-00000001"]
    assert ckpt.read_checkpoint(ckpt.list_checkpoints(tmp_path)[-1]).model["w"].tolist() == [1.0, 1.0]


class _FullDiskFile:
    """A file whose first write puts a few bytes down and then fails as write() on a full disk
    does: OSError(ENOSPC) with no file name."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.f.write(data[:7])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)


def _fill_disk_at(monkeypatch, name):
    """The checkpoint module's open(): writing the file `name` fails for a full disk."""
    real = open

    def fake_open(path, mode="r", *args, **kw):
        f = real(path, mode, *args, **kw)
        return _FullDiskFile(f) if Path(path).name == name and "w" in mode else f

    monkeypatch.setattr(ckpt, "open", fake_open, raising=False)


@pytest.mark.parametrize("failing", ["model.safetensors", "optimizer.safetensors", "trainer.json"])
def test_full_disk_is_one_line_the_partial_write_removed_the_previous_checkpoint_intact(tmp_path, monkeypatch, failing):
    _save(tmp_path, 1)
    before = snapshot(tmp_path)
    _fill_disk_at(monkeypatch, failing)
    with pytest.raises(NanoseekError) as e:
        _save(tmp_path, 2, w=2.0)
    assert str(e.value) == (
        f"{ckpt.checkpoints_dir(tmp_path) / 'step-00000002'}: checkpoint not written: no space left on device "
        f"writing {failing}; the partial write was removed and step-00000001 is the newest checkpoint, intact"
    )
    assert snapshot(tmp_path) == before and _entries(tmp_path) == ["step-00000001"]
    assert ckpt.read_checkpoint(tmp_path / "checkpoints" / "step-00000001").model["w"].tolist() == [1.0, 1.0]


def test_full_disk_with_no_checkpoint_yet_and_when_a_step_is_written_again(tmp_path, monkeypatch):
    _fill_disk_at(monkeypatch, "optimizer.safetensors")
    with pytest.raises(NanoseekError, match=r"optimizer.safetensors; the partial write was removed and there is no "):
        _save(tmp_path, 1)
    assert _entries(tmp_path) == []
    monkeypatch.undo()
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    before = snapshot(tmp_path)
    _fill_disk_at(monkeypatch, "trainer.json")
    with pytest.raises(NanoseekError, match="step-00000002 is the newest checkpoint, intact"):
        _save(tmp_path, 2, w=5.0)  # the same step again (after a rollback): the old one stays until the new is whole
    assert snapshot(tmp_path) == before
    assert ckpt.read_checkpoint(tmp_path / "checkpoints" / "step-00000002").model["w"].tolist() == [1.0, 1.0]


def test_other_write_errors_pass_unchanged_and_leave_no_partial_directory(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    monkeypatch.setattr(ckpt, "save_safetensors", lambda sd: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        _save(tmp_path, 2)
    assert _entries(tmp_path) == ["step-00000001"]


def _written_before(out, key: str) -> None:
    """Every checkpoint of `out` as an older nanoseek wrote it: without the run option `key`."""
    for path in ckpt.list_checkpoints(out):
        meta = path / "trainer.json"
        state = json.loads(meta.read_text())
        del state["config"][key]
        meta.write_text(json.dumps(state))


def test_an_older_checkpoint_resumes_when_a_new_option_is_at_its_default(tmp_path, data, finished, capsys):
    """A run written before `spike_factor` existed resumes with it at its default (2.0, taken as
    what the older code did) and is refused, naming it, with any other value."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    _written_before(out, "spike_factor")
    args = ["pretrain", "--out", str(out), "--resume", "--set", *data_args(data), *SMALL_MODEL, *FAST]
    code = main([*args, "steps=9", "checkpoint_every=3", "spike_factor=3.0"])
    err = capsys.readouterr().err
    assert code == 2 and "different config: spike_factor '<absent>' (checkpoint) vs 3.0 (now)" in err, err
    assert main([*args, "steps=9", "checkpoint_every=3"]) == 0, capsys.readouterr().err
    assert ckpt.list_checkpoints(out)[-1].name.endswith("9")
