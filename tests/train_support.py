"""What the trainer tests share: a small arith corpus and tokenizer, a very small model, and
ways to run `nanoseek pretrain` in a subprocess or in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

# One MoE layer (8 experts, top 2) after one dense layer, plus one MTP module: fast enough
# for tests on 2 shared cores.
SMALL_MODEL = [
    "model.hidden_size=64",
    "model.num_hidden_layers=2",
    "model.intermediate_size=128",
    "model.moe_intermediate_size=32",
    "model.q_lora_rank=32",
    "model.kv_lora_rank=32",
]
FAST = ["seq_len=64", "batch_size=8", "log_every=1", "warmup_steps=3", "tensorboard=false", "progress=false"]


def make_data(root: Path) -> tuple[Path, Path]:
    """An arith corpus (jsonl) and a tokenizer trained on it, made once per directory."""
    corpus, tok = root / "arith.jsonl", root / "tokenizer"
    if not (tok / "tokenizer.json").exists():
        from nanoseek import tasks
        from nanoseek.data.corpus import corpus as make_corpus
        from nanoseek.data.corpus import write_corpus
        from nanoseek.data.stream import iter_documents
        from nanoseek.data.tokenizer import train_tokenizer

        root.mkdir(parents=True, exist_ok=True)
        write_corpus(corpus, make_corpus(tasks.get("arith"), 1500, seed=0))
        train_tokenizer(iter_documents([corpus]), vocab_size=320).save_pretrained(tok)
    return corpus, tok


def data_args(data: tuple[Path, Path]) -> list[str]:
    return [f"data.files=[{data[0]}]", f"data.tokenizer={data[1]}"]


def env_one_thread() -> dict:
    """One thread per process: the same arithmetic in every run, and no fight over shared cores."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def nanoseek_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "nanoseek.cli", *args]


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(nanoseek_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env_one_thread())


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "nanoseek.cli",
        *args,
    ]


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "event" not in r}


def train_here(out: Path, overrides: list[str], stage: str = "pretrain", resume=None) -> dict:
    """Run the trainer in this process on one thread."""
    from nanoseek.train.config import load_config
    from nanoseek.train.pretrain import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(load_config(None, overrides), out, stage=stage, resume=resume)
    finally:
        torch.set_num_threads(threads)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes, to show that a failed command touched nothing."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
