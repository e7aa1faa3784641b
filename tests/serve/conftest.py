"""Fixtures of the server tests: one tiny chat checkpoint per test module, and an engine on it
in this process (what the server should answer)."""

import pytest

from nanoseek.infer import Engine

from serve_support import save_chat_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_chat_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine.from_pretrained(model_dir, max_batch_size=16, max_seq_len=512)
