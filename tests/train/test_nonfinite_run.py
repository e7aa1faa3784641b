"""Runs whose numbers stop being finite end with one line naming the step, however the
non-finite values come back, and a full disk writing the model keeps the previous export.
(The guard's skip and rollback before the stop are tested in test_pretrain.py.)"""

import errno
import os

import pytest
import torch

from nanoseek import storage
from nanoseek.cli import main
from nanoseek.errors import NanoseekError
from nanoseek.io import hf
from nanoseek.train import checkpoint as ckpt
from nanoseek.train import pretrain
from nanoseek.train.metrics import read_metrics

from train_support import FAST, SMALL_MODEL, data_args, make_data, snapshot, train_here


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def nan_loss_when(monkeypatch, bad, limit=60):
    """Run.train_step with a NaN loss on the calls where bad(call, step) holds; a run still going
    after `limit` calls fails the test instead of running on."""
    real = pretrain.Run.train_step
    calls = []

    def step(self, x, y):
        calls.append(self.step + 1)
        assert len(calls) <= limit, f"the run did not stop: steps {calls}"
        result = real(self, x, y)
        if bad(len(calls), self.step + 1):
            result["loss"] = float("nan")
        return result

    monkeypatch.setattr(pretrain.Run, "train_step", step)
    return calls


def events(out):
    return [(r["step"], r["event"]) for r in read_metrics(out / "metrics.jsonl") if "event" in r]


def test_nonfinite_again_after_each_rollback_stops_instead_of_looping(tmp_path, data, monkeypatch):
    """After each rollback to step 4 one step is good, then NaN again: the second rollback to the
    same checkpoint stops the run (the stream of batches never ends, so nothing else would)."""
    nan_loss_when(monkeypatch, lambda call, step: call > 4 and step != 5)
    out = tmp_path / "run"
    with pytest.raises(NanoseekError) as e:
        train_here(out, [*data_args(data), *SMALL_MODEL, *FAST, "steps=12", "checkpoint_every=4"])
    step4 = ckpt.checkpoints_dir(out) / "step-00000004"
    assert str(e.value).startswith(
        f"step 8: the loss is nan (3 steps in a row); also after rolling back to step 4; {step4} is intact"
    ), str(e.value)
    assert events(out) == [
        (6, "spike_skipped"),
        (7, "spike_skipped"),
        (8, "rollback"),
        (6, "spike_skipped"),
        (7, "spike_skipped"),
        (8, "stopped_nonfinite"),
    ]
    assert ckpt.list_checkpoints(out) == [step4] and not (out / "hf").exists()


def test_a_new_checkpoint_allows_another_rollback(tmp_path, data, monkeypatch):
    """NaN streaks at steps 6-8 and, after the rollback to 4 and the checkpoint of step 12, at steps
    14-16: each rolls back once (to 4, then to 12) and the run finishes."""
    nan_loss_when(monkeypatch, lambda call, step: call in (6, 7, 8, 18, 19, 20))
    out = tmp_path / "run"
    summary = train_here(out, [*data_args(data), *SMALL_MODEL, *FAST, "steps=16", "checkpoint_every=4"])
    rollbacks = [(r["step"], r["to_step"]) for r in read_metrics(out / "metrics.jsonl") if r.get("event") == "rollback"]
    assert rollbacks == [(8, 4), (16, 12)] and summary["steps"] == 16


@pytest.mark.parametrize("every_time", [False, True])
def test_nonfinite_weights_at_the_end_of_the_run_are_not_written(tmp_path, data, monkeypatch, capsys, every_time):
    """The weights go NaN between checkpoints (at step 5) and the last step (6) is skipped: the run
    goes back to step 4 rather than write them. Once, it then finishes with finite weights; every
    time, it stops with one line naming step 6, and writes no checkpoint or model."""
    real = pretrain.Run.train_step
    calls = []

    def step(self, x, y):
        result = real(self, x, y)
        calls.append(self.step + 1)
        if self.step + 1 == 5 and (every_time or len(calls) == 5):
            with torch.no_grad():
                self.model.norm.weight[0] = float("nan")
        return result

    monkeypatch.setattr(pretrain.Run, "train_step", step)
    out = tmp_path / "run"
    args = [
        "pretrain",
        "--out",
        str(out),
        "--set",
        *data_args(data),
        *SMALL_MODEL,
        *FAST,
        "steps=6",
        "checkpoint_every=4",
    ]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert (6, "rollback") in events(out)
    step4 = ckpt.checkpoints_dir(out) / "step-00000004"
    if not every_time:
        assert code == 0 and calls == [1, 2, 3, 4, 5, 6, 5, 6]
        assert not storage.nonfinite_names(hf.load_pretrained(out / "hf").state_dict())
        return
    assert code == 2
    assert err[-1] == (
        f"error: step 6: the weights hold NaN or inf; also after rolling back to step 4; {step4} is intact; "
        "the run stops here (lower the learning rate, or look for bad data at this step)"
    )
    assert ckpt.list_checkpoints(out) == [step4] and not (out / "hf").exists()
    assert not storage.nonfinite_names(ckpt.read_checkpoint(step4).model)


def test_cli_stops_with_one_line_and_exit_2(tmp_path, data, monkeypatch, capsys):
    nan_loss_when(monkeypatch, lambda call, step: call >= 2)
    out = tmp_path / "run"
    code = main(["pretrain", "--out", str(out), "--set", *data_args(data), *SMALL_MODEL, *FAST, "steps=12"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == (
        "error: step 4: the loss is nan (3 steps in a row); no checkpoint to roll back to (the first is written at "
        "step 12); the run stops here (lower the learning rate, or look for bad data at this step)"
    )
    assert ckpt.list_checkpoints(out) == [] and not (out / "hf").exists()


def test_full_disk_writing_the_model_keeps_the_previous_export(tmp_path, data, monkeypatch):
    out = tmp_path / "run"
    overrides = [*data_args(data), *SMALL_MODEL, *FAST, "checkpoint_every=2"]
    train_here(out, [*overrides, "steps=2"])
    before = snapshot(out / "hf")
    real = hf.save_pretrained

    def full(model, path, *args, **kw):
        real(model, path, *args, **kw)  # the files are down, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path / "model.safetensors"))

    monkeypatch.setattr(hf, "save_pretrained", full)
    with pytest.raises(NanoseekError) as e:
        train_here(out, [*overrides, "steps=4"])  # resumes at step 2
    assert str(e.value) == (
        f"{out / 'hf'}: not written: no space left on device (the partial write was removed; "
        "what was there before is intact)"
    )
    assert snapshot(out / "hf") == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert [p.name for p in ckpt.list_checkpoints(out)][-1] == "step-00000004"
