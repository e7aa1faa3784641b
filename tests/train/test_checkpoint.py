"""Checkpoints: atomic writes, exact resume after SIGKILL, and clean failure on a bad checkpoint."""

import json
import shutil
import signal
import subprocess
import time

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
