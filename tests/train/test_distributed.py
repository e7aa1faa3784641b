"""torch.distributed on the CPU (gloo, 2 processes under torchrun): FSDP2 data parallelism and
expert parallelism give the single-process losses for the same global batch, and a
distributed checkpoint (torch.distributed.checkpoint: each rank writes its shards) resumes
bit for bit, on 2 ranks or in one process."""

import shutil
import subprocess

import pytest
import torch

from nanoseek.errors import NanoseekError
from nanoseek.io.hf import load_pretrained
from nanoseek.train.checkpoint import list_checkpoints, read_checkpoint

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
    r = subprocess.run(
        torchrun_cmd(2, "pretrain", "--out", str(out), "--set", *data_args(data), *SMALL_MODEL, *FAST, *STEPS, *extra),
        capture_output=True,
        text=True,
        timeout=300,
        env=env_one_thread(),
    )
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


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("fsdp")
    torchrun(out, data)
    return out


def test_fsdp_matches_single_process(fsdp, single):
    assert_same_run(fsdp, single)


def test_each_rank_writes_its_own_shards(fsdp):
    """A 2-rank checkpoint is DCP's: one file per rank, each with about half the tensors' bytes
    (FSDP shards every parameter and its moments: no rank holds the whole model)."""
    c = list_checkpoints(fsdp)[-1]
    names = sorted(p.name for p in c.iterdir())
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp", "trainer.json"]
    sizes = [(c / f"__{r}_0.distcp").stat().st_size for r in (0, 1)]
    assert max(sizes) < 0.6 * sum(sizes), sizes
    loaded = read_checkpoint(c)
    assert loaded.sharded and loaded.step == 4 and loaded.shapes["embed_tokens.weight"] == (320, 64)


def test_a_corrupt_shard_is_named(tmp_path, fsdp):
    out = tmp_path / "run"
    shutil.copytree(fsdp, out)
    shard = list_checkpoints(out)[-1] / "__1_0.distcp"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(NanoseekError, match=f"{shard}: corrupt checkpoint"):
        read_checkpoint(shard.parent)


def interrupted(src, dst):
    """`src` as a crash after its step-2 checkpoint leaves it: later checkpoints gone, no hf/, and
    a half-written checkpoint directory."""
    shutil.copytree(src, dst)
    for c in list_checkpoints(dst)[1:]:
        shutil.rmtree(c)
    shutil.rmtree(dst / "hf")
    partial = dst / "checkpoints" / ".tmp-step-00000003"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half a shard")
    return dst


def assert_bit_exact(a, b):
    assert losses(a) == losses(b) and len(losses(a)) == 4
    wa, wb = load_pretrained(a / "hf").state_dict(), load_pretrained(b / "hf").state_dict()
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_fsdp_checkpoint_resumes_bit_for_bit(tmp_path, data, fsdp):
    out = interrupted(fsdp, tmp_path / "run")
    r = torchrun(out, data)
    assert "resuming" in r.stderr and "step 2" in r.stderr
    assert not (out / "checkpoints" / ".tmp-step-00000003").exists()
    assert_bit_exact(out, fsdp)


def test_two_rank_checkpoint_resumes_in_one_process(tmp_path, data, fsdp, single):
    """DCP reassembles the shards into full tensors: the single process goes on from step 2 as
    the 2 ranks did (up to the rounding of a different reduction order)."""
    out = interrupted(fsdp, tmp_path / "run")
    train_here(out, [*data_args(data), *SMALL_MODEL, *FAST, *STEPS])
    assert_same_run(out, single)
    assert not read_checkpoint(list_checkpoints(out)[-1]).sharded  # one process writes safetensors


def test_expert_parallel_matches_single_process(data, single, expert_parallel):
    assert_same_run(expert_parallel, single)


def test_expert_parallel_checkpoint_resumes_bit_for_bit(tmp_path, data, expert_parallel):
    """Lose everything after the step-2 checkpoint, run the same command: it resumes there and
    logs the same losses, and ends with the same weights, as the uninterrupted run. Each rank
    wrote the experts it owns and reads them back."""
    out = interrupted(expert_parallel, tmp_path / "run")
    r = torchrun(out, data, "expert_parallel=true")
    assert "resuming" in r.stderr and "step 2" in r.stderr
    assert_bit_exact(out, expert_parallel)
