"""Shared by tests/serve: a tiny random chat model, `nanoseek serve` in a subprocess or in a thread,
and probes of /health and /metrics."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import torch

from nanoseek import ModelConfig, Transformer, save_pretrained
from nanoseek.data import format_chat, train_tokenizer
from nanoseek.infer import SamplingParams

from model_support import ENGINE_CONFIG

KEY = "test-key"
CONFIG = ENGINE_CONFIG


# ---- the model and the server (also used by test_web_chat.py) -----------------------------
def save_chat_model(directory):
    """A tiny random model + tokenizer in HF format; it never writes a special token."""
    texts = ["3+4-2+5 = 10", "<think>3+4=7, 7-2=5</think> <answer>5</answer>", "The quick brown fox jumps."] * 20
    tokenizer = train_tokenizer(texts, vocab_size=CONFIG["vocab_size"])
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**CONFIG)).eval()
    with torch.no_grad():
        for i in tokenizer.special_ids.values():
            model.lm_head.weight[i] = 0
    save_pretrained(model, directory)
    tokenizer.save_pretrained(directory)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`nanoseek serve` in a subprocess, up when /health answers."""

    def __init__(self, model_dir, log_file, *args):
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_file = log_file
        cmd = [
            sys.executable,
            "-m",
            "nanoseek.cli",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            self.url.rsplit(":", 1)[1],
            "--log-level",
            "warning",
            *args,
        ]
        with open(log_file, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
            )
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"the server did not come up:\n{self.log()}"
            time.sleep(0.2)

    def log(self) -> str:
        return open(self.log_file, encoding="utf-8", errors="replace").read()

    def stop(self) -> int:
        """Ctrl-C: uvicorn shuts down gracefully and the command exits 0."""
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the server did not stop on SIGINT:\n{self.log()}") from None


def health(url) -> dict:
    return httpx.get(url + "/health", timeout=5).json()


def wait_idle(url, timeout=10.0) -> float:
    """Seconds until no completion is pending or running on the server."""
    start = time.monotonic()
    while True:
        h = health(url)
        if h["pending"] == 0 and h["running"] == 0 and h["waiting"] == 0:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, f"still busy after {timeout}s: {h}"
        time.sleep(0.02)


def metric(url, name) -> float:
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def engine_steps(url) -> int:
    return int(metric(url, "nanoseek_engine_steps_total"))


MODEL = "tiny"  # the checkpoint directory's name
MESSAGES = [{"role": "user", "content": "What is 3+4-2?"}]


def expected_message(engine, messages, **params):
    """(reasoning, content, raw text) that the engine gives for a chat, greedy."""
    out = engine.generate(format_chat(messages), SamplingParams(temperature=0, **params))[0].outputs[0]
    reasoning, _, content = out.text.partition("</think>")
    return reasoning.strip(), content.strip(), out


def reasoning_of(obj):
    return getattr(obj, "reasoning_content", None)


@contextlib.contextmanager
def serve_in_thread(engine, **kwargs):
    """`create_app(engine, MODEL, **kwargs)` on uvicorn in a thread of this process; yields its URL."""
    import uvicorn

    from nanoseek.serve.app import create_app

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(engine, MODEL, **kwargs), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the in-process server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "the in-process server did not stop"
