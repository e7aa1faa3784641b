"""torch.distributed on the CPU (gloo, 2 processes under torchrun): FSDP2 data parallelism and
expert parallelism give the single-process losses for the same global batch, and a
distributed checkpoint resumes."""

import shutil
import subprocess

import pytest
import torch

from nanoseek.io.hf import load_pretrained
from nanoseek.train.checkpoint import list_checkpoints
from train_support import FAST, SMALL_MODEL, data_args, env_one_thread, losses, make_data, torchrun_cmd, train_here

STEPS = ["steps=4", "checkpoint_every=2", "keep_checkpoints=4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def single(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("single")
    train_here(out, [*data_args(data), *SMALL_MODEL, *FAST, *STEPS])
    return out


def torchrun(out, data, *extra):
    r = subprocess.run(torchrun_cmd(2, "pretrain", "--out", str(out), "--set", *data_args(data), *SMALL_MODEL,
                                    *FAST, *STEPS, *extra),
                       capture_output=True, text=True, timeout=300, env=env_one_thread())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def expert_parallel(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("ep")
    torchrun(out, data, "expert_parallel=true")
    return out


def assert_same_run(a, b, tol=1e-5):
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys() and len(la) == 4
    for step in la:
        assert la[step] == pytest.approx(lb[step], rel=tol), step
    wa, wb = load_pretrained(a / "hf").state_dict(), load_pretrained(b / "hf").state_dict()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-4, msg=name)


def test_fsdp_matches_single_process(tmp_path, data, single):
    torchrun(tmp_path, data)
    assert_same_run(tmp_path, single)


def test_expert_parallel_matches_single_process(data, single, expert_parallel):
    assert_same_run(expert_parallel, single)


def test_distributed_checkpoint_resumes(tmp_path, data, expert_parallel):
    """Lose everything after the step-2 checkpoint, run the same command: it resumes there and
    logs the same losses as the uninterrupted run."""
    out = tmp_path / "run"
    shutil.copytree(expert_parallel, out)
    for c in list_checkpoints(out)[1:]:
        shutil.rmtree(c)
    shutil.rmtree(out / "hf")
    r = torchrun(out, data, "expert_parallel=true")
    assert "resuming" in r.stderr and "step 2" in r.stderr
    assert losses(out) == losses(expert_parallel)
