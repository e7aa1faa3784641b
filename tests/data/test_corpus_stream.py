"""The synthetic corpus, the packed token stream (determinism, exact resume) and the SFT dataset."""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoseek import tasks
from nanoseek.data import PackedStream, SFTDataset, Tokenizer, iter_documents, r1_zero_prompt, train_tokenizer
from nanoseek.data import cli as data_cli
from nanoseek.data.chat import EOS, R1_ZERO_PREAMBLE
from nanoseek.data.corpus import DEFAULT_MIX, corpus, terse, write_corpus
from nanoseek.data.stream import IGNORE_INDEX
from nanoseek.errors import NanoseekError
from nanoseek.tasks import Step, split_of

STEP = re.compile(r"(-?\d+)([-+*])(\d+)=(-?\d+)")


def step_is_right(line):
    m = STEP.fullmatch(line)
    a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
    return {"+": a + b, "-": a - b, "*": a * b}[op] == c


# ---- corpus -------------------------------------------------------------------------------
def test_corpus_mix_and_template():
    task = tasks.get("arith")
    docs = list(corpus(task, 1000, seed=0))
    assert docs == list(corpus(task, 1000, seed=0))
    kinds = [k for k, _ in docs]
    assert {k: kinds.count(k) for k in DEFAULT_MIX} == {k: round(1000 * v) for k, v in DEFAULT_MIX.items()}
    for kind, text in docs:
        if kind == "plain":
            assert "User:" not in text and all(step_is_right(line) for line in text.splitlines())
            continue
        question = text.split("\nUser: ", 1)[1].split("\nAssistant:", 1)[0]
        assert split_of(question, task.test_share) == "train"  # the test split stays unseen
        assert text.startswith(r1_zero_prompt(question) + " <think>")  # exactly the RL template
        reasoning = text.split("<think>")[-1].split("</think>")[0]
        answer = text.split("<answer>")[-1].split("</answer>")[0]
        if kind == "direct":
            assert reasoning == ""
        else:
            steps = reasoning.split(", ")
            assert steps[-1].endswith(f"={answer}")
            if kind == "worked":
                assert all(step_is_right(s) for s in steps)


def test_corpus_preamble_share_and_recall_drills():
    task = tasks.get("chain", signed=True)
    docs = list(corpus(task, 2000, seed=3, mix={"worked": 0.5, "direct": 0.2, "recall": 0.3}, preamble=0.25))
    chat = [text for kind, text in docs if kind != "recall"]
    with_preamble = sum(text.startswith(R1_ZERO_PREAMBLE) for text in chat) / len(chat)
    assert 0.2 < with_preamble < 0.3
    assert all(text.startswith(R1_ZERO_PREAMBLE + "User: ") or text.startswith("User: ") for text in chat)
    for kind, text in docs:
        if kind == "recall":  # every binding, once, in another order
            bindings, recalled = text.split(". ")
            assert sorted(recalled.split(",")) == sorted(bindings.split(",")) and "User:" not in text
    assert (
        sum(
            kind == "recall" and text.split(". ")[0].split(",") != text.split(". ")[1].split(",") for kind, text in docs
        )
        > 500
    )
    with pytest.raises(NanoseekError, match="no named values to recall"):
        list(corpus(tasks.get("arith"), 10, mix={"recall": 1.0}))
    with pytest.raises(NanoseekError, match="unknown document kind 'proofs'"):
        list(corpus(task, 10, mix={"proofs": 1.0}))
    with pytest.raises(NanoseekError, match="preamble share"):
        list(corpus(task, 10, preamble=1.5))


def test_terse_merges_steps_in_order():
    steps = [Step(3, "+", 4, 7), Step(7, "-", 2, 5), Step(5, "+", 1, 6)]
    assert terse(steps) == ["3+4-2=5", "5+1=6"]
    assert terse([Step(3, "+", 4, 7), Step(7, "*", 2, 14)]) == ["(3+4)*2=14"]
    assert terse([Step(4, "*", 2, 8), Step(3, "+", 8, 11)]) == ["4*2=8", "3+8=11"]  # not a chain


def test_corpus_bad_mix():
    with pytest.raises(NanoseekError, match="mix"):
        list(corpus(tasks.get("arith"), 10, mix={"worked": -1, "direct": 1}))
    with pytest.raises(NanoseekError, match="no step-by-step"):
        list(corpus(tasks.get("gsm8k"), 2))


@pytest.mark.parametrize(
    "mix, message",
    [
        ({"worked": 1.5, "direct": -0.5}, "corpus mix: share of 'worked' must be in [0, 1], got 1.5"),
        ({"worked": 0.5, "direct": -0.5, "plain": 1.0}, "corpus mix: share of 'direct' must be in [0, 1], got -0.5"),
        ({"worked": float("nan"), "direct": 1.0}, "corpus mix: share of 'worked' must be in [0, 1], got nan"),
        ({"worked": float("inf")}, "corpus mix: share of 'worked' must be in [0, 1], got inf"),
        ({"worked": "half", "direct": 0.5}, "corpus mix: share of 'worked' must be in [0, 1], got 'half'"),
        ({"worked": 0.5, "direct": 0.4}, "corpus mix: shares add up to 0.9, not 1"),
        ({"worked": 1, "direct": 1}, "corpus mix: shares add up to 2, not 1"),
        ({"worked": 0.0}, "corpus mix: shares add up to 0, not 1"),
    ],
)
def test_corpus_mix_shares_are_in_0_1_and_add_up_to_1(mix, message):
    """Not renormalised in silence: a share of 1.5 or a sum of 0.9 is a typo."""
    with pytest.raises(NanoseekError) as e:
        list(corpus(tasks.get("arith"), 10, mix=mix))
    assert str(e.value) == message


def test_corpus_mix_within_rounding_of_1_and_the_shipped_mixes():
    from nanoseek.demo import Plan

    assert abs(sum(DEFAULT_MIX.values()) - 1) < 1e-9 and abs(sum(dict(Plan.mix).values()) - 1) < 1e-9
    kinds = [k for k, _ in corpus(tasks.get("arith"), 30, mix={"worked": 0.1 + 0.2, "direct": 0.7 - 1e-7})]
    assert (kinds.count("worked"), kinds.count("direct")) == (9, 21)


def test_data_corpus_flags_that_do_not_add_up_are_one_line(tmp_path, capsys):
    from nanoseek.cli import main

    out = tmp_path / "c.jsonl"
    assert main(["data", "corpus", "--docs", "20", "--recall", "0.3", "--task", "chain", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "error: corpus mix: shares add up to 1.3, not 1 "
        "(--worked 0.5 --direct 0.3 --terse 0.1 --plain 0.1 --recall 0.3)"
    )
    assert not out.exists()
    assert main(["data", "corpus", "--docs", "20", "--out", str(out)]) == 0  # the defaults add up to 1
    assert "20 documents" in capsys.readouterr().out and len(out.read_text().splitlines()) == 20


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_write_and_read_back(tmp_path, suffix):
    docs = list(corpus(tasks.get("arith", max_ops=3), 50, seed=2))
    counts = write_corpus(tmp_path / f"c{suffix}", iter(docs))
    assert sum(counts.values()) == 50
    assert list(iter_documents(tmp_path / f"c{suffix}")) == [text for _, text in docs]


# ---- packed stream --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tokenizer and three files, one of each kind, with documents of varied lengths."""
    root = tmp_path_factory.mktemp("data")
    docs = [text for _, text in corpus(tasks.get("arith"), 120, seed=5)]
    with open(root / "a.jsonl", "w") as f:
        for text in docs[:60]:
            f.write(json.dumps({"text": text}) + "\n")
    (root / "b.txt").write_text("\n\n".join(docs[60:100]) + "\n")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist([{"text": t} for t in docs[100:]]), root / "c.parquet")
    tok = train_tokenizer(docs, vocab_size=300)
    return tok, root, docs


def take(stream, n):
    return [next(stream) for _ in range(n)]


def test_stream_shapes_and_targets(data):
    tok, root, _ = data
    stream = PackedStream(root, tok, seq_len=32, batch_size=4, seed=0)
    x, y = next(stream)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_stream_reads_every_token_in_order(data):
    tok, root, docs = data
    files = [root / "a.jsonl", root / "b.txt", root / "c.parquet"]
    stream = PackedStream(files, tok, seq_len=15, batch_size=1, shuffle=False, loop=False)
    got = [t for x, y in stream for t in torch.cat([x[0], y[0, -1:]]).tolist()]
    expected = [t for d in docs for t in tok.encode(d, bos=True, eos=True)]
    assert len(expected) - 16 < len(got) <= len(expected) and got == expected[: len(got)]


def test_stream_is_seeded(data):
    tok, root, _ = data
    a = take(PackedStream(root, tok, 24, 2, seed=1, shuffle_block=7), 30)
    b = take(PackedStream(root, tok, 24, 2, seed=1, shuffle_block=7), 30)
    c = take(PackedStream(root, tok, 24, 2, seed=2, shuffle_block=7), 30)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_stream_resumes_exactly_across_epochs(data):
    tok, root, _ = data
    stream = PackedStream(root, tok, seq_len=40, batch_size=3, seed=7, shuffle_block=5)
    n_tokens = sum(len(tok.encode(t, bos=True, eos=True)) for t in iter_documents(root))
    n_batches = 3 * n_tokens // (3 * 41)  # about three epochs
    reference = take(stream, n_batches)
    for stop in (1, n_batches // 3, n_batches // 2 + 1):
        first = PackedStream(root, tok, seq_len=40, batch_size=3, seed=7, shuffle_block=5)
        take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
        resumed = PackedStream(root, tok, seq_len=40, batch_size=3, seed=7, shuffle_block=5)
        resumed.load_state_dict(state)
        for want, got in zip(reference[stop:], take(resumed, n_batches - stop)):
            assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    assert reference[-1] is not None and stream.state_dict()["epoch"] >= 2


def test_stream_ranks_split_the_rows(data):
    tok, root, _ = data
    whole = [x for x, _ in take(PackedStream(root, tok, 16, 1, seed=3), 10)]
    r0 = [x for x, _ in take(PackedStream(root, tok, 16, 1, seed=3, rank=0, world_size=2), 5)]
    r1 = [x for x, _ in take(PackedStream(root, tok, 16, 1, seed=3, rank=1, world_size=2), 5)]
    assert all(torch.equal(w, r) for w, r in zip(whole[0::2], r0))
    assert all(torch.equal(w, r) for w, r in zip(whole[1::2], r1))


def test_stream_errors(data, tmp_path):
    tok, _, _ = data
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(NanoseekError, match="no documents"):
        next(PackedStream(tmp_path / "empty.txt", tok, 8))
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "hi"}) + "\n")
    with pytest.raises(NanoseekError, match="no string field 'text'"):
        next(PackedStream(tmp_path / "x.jsonl", tok, 8))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(NanoseekError, match="unknown file type"):
        PackedStream(tmp_path / "x.csv", tok, 8)
    with pytest.raises(NanoseekError, match="no such file"):
        PackedStream(tmp_path / "missing.jsonl", tok, 8)


def _bad_third_line(path: Path, kind: str) -> Path:
    """A .txt or .jsonl whose third line holds a Latin-1 byte (0xe9, 'é' in Latin-1)."""
    lines = (
        [b"one plus one", b"", b"caf\xe9 au lait", b"two"]
        if kind == "txt"
        else [json.dumps({"text": t}).encode() for t in ("a", "b")] + [b'{"text": "caf\xe9"}']
    )
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_a_file_that_is_not_utf8_names_the_file_and_line(data, tmp_path, kind):
    """Not text silently replaced with U+FFFD, nor a UnicodeDecodeError: one line naming path:line."""
    tok, _, _ = data
    path = _bad_third_line(tmp_path / f"latin1.{kind}", kind)
    with pytest.raises(NanoseekError) as e:
        list(iter_documents(path))
    column = 4 if kind == "txt" else 14  # the byte after "caf"
    assert str(e.value) == f"{path}:3: not UTF-8 text (byte 0xe9 at column {column})"
    with pytest.raises(NanoseekError, match=re.escape(f"{path}:3: not UTF-8 text")):
        next(PackedStream(path, tok, 8))


def test_a_utf16_file_gets_a_hint_and_a_utf8_bom_is_dropped(tmp_path):
    (tmp_path / "wide.txt").write_bytes("hello\n\nworld\n".encode("utf-16"))
    with pytest.raises(NanoseekError, match=r"wide.txt:1: not UTF-8 text .*\(UTF-16\? save it as UTF-8\)$"):
        list(iter_documents(tmp_path / "wide.txt"))
    (tmp_path / "bom.txt").write_bytes("\ufeffhello\n\nworld\n".encode())
    assert list(iter_documents(tmp_path / "bom.txt")) == ["hello", "world"]
    (tmp_path / "bom.jsonl").write_bytes(("\ufeff" + json.dumps({"text": "hi"}) + "\n").encode())
    assert list(iter_documents(tmp_path / "bom.jsonl")) == ["hi"]


# ---- SFT ----------------------------------------------------------------------------------------
CHATS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "3+4?"},
        {"role": "assistant", "content": "7", "reasoning_content": "3+4=7"},
    ],
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>2+2=4</think>4"},
        {"role": "user", "content": "and 4+1?"},
        {"role": "assistant", "content": "5"},
    ],
]


def test_sft_mask_covers_what_the_assistant_writes(data):
    tok, _, _ = data
    ds = SFTDataset(CHATS, tok)
    ids, mask = ds[0]
    assert len(ids) == len(mask) and ids[0] == tok.bos_id
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "3+4=7\n</think>\n\n7" + EOS
    ids, mask = ds[1]
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "2+2=4\n</think>\n\n4" + EOS + "\n</think>\n\n5" + EOS
    prompt = [i for i, m in zip(ids, mask) if not m]
    assert tok.decode(prompt).endswith("<｜Assistant｜><think>\n")


def test_sft_chat_data_that_is_not_utf8_names_the_file_and_line(data, tmp_path):
    tok, _, _ = data
    path = tmp_path / "chats.jsonl"
    good = [json.dumps({"messages": m}).encode() for m in CHATS]
    path.write_bytes(b"\n".join([*good, b'{"messages": [{"role": "user", "content": "\xff"}]}']) + b"\n")
    with pytest.raises(NanoseekError) as e:
        SFTDataset(path, tok)
    assert str(e.value) == f"{path}:3: not UTF-8 text (byte 0xff at column 44)"


def test_sft_collate_and_batches(data, tmp_path):
    tok, _, _ = data
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    ds = SFTDataset(path, tok, max_len=40)
    assert len(ds) == 2 and all(len(ds[i][0]) <= 40 for i in range(2))
    x, y = ds.collate([ds[0], ds[1]])
    assert x.shape == y.shape and x.shape[0] == 2
    for b in range(2):
        ids, mask = ds[b]
        n = len(ids) - 1
        assert x[b, :n].tolist() == ids[:-1]
        assert y[b, :n].tolist() == [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
        assert (y[b, n:] == IGNORE_INDEX).all() and (x[b, n:] == tok.pad_id).all()
    assert SFTDataset([path, path], tok).conversations == CHATS + CHATS  # a list of files
    batches = list(ds.batches(batch_size=1, seed=0))
    assert len(batches) == 2
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(NanoseekError, match="no list field 'messages'"):
        SFTDataset(tmp_path / "bad.jsonl", tok)


# ---- command line -------------------------------------------------------------------------------
def parser():
    p = argparse.ArgumentParser(prog="nanoseek")
    data_cli.register(p.add_subparsers(dest="command"))
    return p


def run(argv):
    args = parser().parse_args(argv)
    return args.func(args)


def test_cli_corpus_then_tokenizer(tmp_path, capsys):
    out = tmp_path / "corpus.jsonl"
    assert (
        run(
            [
                "data",
                "corpus",
                "--task",
                "arith",
                "--out",
                str(out),
                "--docs",
                "300",
                "--max-ops",
                "3",
                "--max-operand",
                "9",
                "--seed",
                "4",
            ]
        )
        == 0
    )
    assert "wrote 300 documents" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 300 and {r["kind"] for r in rows} == set(DEFAULT_MIX)
    assert run(["tokenizer", "train", "--input", str(out), "--vocab-size", "320", "--out", str(tmp_path / "tok")]) == 0
    tok = Tokenizer.from_pretrained(tmp_path / "tok")
    assert tok.vocab_size <= 320 and tok.bos_id == 0
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert hf.encode(rows[0]["text"], add_special_tokens=False) == tok.encode(rows[0]["text"])


def test_cli_chain_corpus_with_recall_and_a_punctuation_split_tokenizer(tmp_path, capsys):
    out = tmp_path / "chain.jsonl"
    assert (
        run(
            [
                "data",
                "corpus",
                "--task",
                "chain",
                "--signed",
                "--out",
                str(out),
                "--docs",
                "200",
                "--worked",
                "0.5",
                "--direct",
                "0.3",
                "--terse",
                "0",
                "--plain",
                "0",
                "--recall",
                "0.2",
                "--preamble",
                "0.5",
            ]
        )
        == 0
    )
    assert "wrote 200 documents to" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["kind"] for r in rows} == {"worked", "direct", "recall"}
    assert any("=-" in r["text"] for r in rows)  # signed values
    assert (
        run(
            [
                "tokenizer",
                "train",
                "--input",
                str(out),
                "--vocab-size",
                "300",
                "--split-punctuation",
                "--out",
                str(tmp_path / "tok"),
            ]
        )
        == 0
    )
    tok = Tokenizer.from_pretrained(tmp_path / "tok")
    text = next(r["text"] for r in rows if r["kind"] == "worked" and "=-" in r["text"])
    pieces = [tok.id_to_token(i) for i in tok.encode(text)]
    assert "=-" not in pieces and "=" in pieces and "-" in pieces and tok.decode(tok.encode(text)) == text
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)


def test_cli_errors(tmp_path):
    with pytest.raises(NanoseekError, match="vocab-size"):
        run(["tokenizer", "train", "--input", str(Path(__file__)), "--vocab-size", "10", "--out", str(tmp_path)])
    with pytest.raises(NanoseekError, match="unknown file type"):
        run(["tokenizer", "train", "--input", str(Path(__file__)), "--out", str(tmp_path)])
    with pytest.raises(NanoseekError, match="another task"):
        run(["data", "corpus", "--out", str(tmp_path / "c.jsonl"), "--min-numbers", "3"])
    with pytest.raises(NanoseekError, match="min_ops"):
        run(["data", "corpus", "--out", str(tmp_path / "c.jsonl"), "--min-ops", "5", "--max-ops", "2"])


def main_cli():
    try:
        from nanoseek.cli import main
    except Exception as e:  # the model files are edited by another change
        pytest.skip(f"nanoseek.cli does not import: {e!r}")
    return main


def test_cli_main(tmp_path, capsys):
    """Through the main `nanoseek` command; skipped while it cannot import."""
    main = main_cli()
    corpus_file = tmp_path / "c.txt"
    assert main(["data", "corpus", "--out", str(corpus_file), "--docs", "100"]) == 0
    assert (
        main(["tokenizer", "train", "--input", str(corpus_file), "--vocab-size", "300", "--out", str(tmp_path / "tok")])
        == 0
    )
    assert (tmp_path / "tok" / "tokenizer_config.json").is_file()
    capsys.readouterr()
    assert main(["tokenizer", "train", "--input", str(corpus_file), "--vocab-size", "5", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: --vocab-size 5")


def test_cli_from_a_fresh_process(tmp_path):
    """`python -m nanoseek.cli` as a user runs it."""
    main_cli()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "nanoseek.cli", "data", "corpus", "--out", str(tmp_path / "c.jsonl"), "--docs", "10"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "wrote 10 documents" in done.stdout, done.stderr


def test_a_followup_document_is_what_a_chat_sends_for_a_second_question():
    """The history turn as the web chat and the API send it back (the answer, no reasoning), in
    the R1-Zero format the tokenizer names; then the second problem worked with its own values."""
    from nanoseek.data.chat import BOS, format_chat
    from nanoseek.data.corpus import completion, corpus
    from nanoseek.tasks import get

    task = get("chain", min_values=2, max_values=4, signed=True)
    docs = [text for kind, text in corpus(task, 20, seed=3, mix={"followup": 1.0}) if kind == "followup"]
    assert len(docs) == 20
    problems = task.sample(40, "train", 3, distinct=False)
    second, first = problems[0], problems[1]  # the document's problem, then its history's
    history = [
        {"role": "user", "content": first.prompt},
        {"role": "assistant", "content": first.answer},
        {"role": "user", "content": second.prompt},
    ]
    prompt = format_chat(history, prompt_format="r1-zero").removeprefix(BOS)
    assert docs[0] == prompt + completion(task.worked(second), second.answer)
    assert docs[0].count("User: ") == 2 and task.worked(second) in docs[0]


def test_a_default_corpus_is_pinned_and_switch_zero_draws_nothing():
    """The demo's corpus is the one it was before `switch` existed (a digest taken before)."""
    import hashlib

    chain = tasks.get("chain", min_values=2, max_values=7, min_value=1, max_value=5, signed=True)
    docs = list(corpus(chain, 200, seed=0, mix={"worked": 0.4, "direct": 0.4, "plain": 0.2}, preamble=0.25))
    assert hashlib.sha256(repr(docs).encode()).hexdigest()[:16] == "8986ae1330035136"
    two = tasks.get("chain", signed=True, languages=["en", "el"])
    mix = {"worked": 0.5, "followup": 0.3, "recall": 0.2}
    docs = list(corpus(two, 100, seed=1, mix=mix, preamble=0.5, switch=0.0))
    assert hashlib.sha256(repr(docs).encode()).hexdigest()[:16] == "a03d6f31b0f39722"


def test_corpus_switch_mixes_languages_mid_solution():
    from nanoseek.tasks.chain import LANGUAGE_NAMES

    def last_think(text):
        return text.rsplit("<think>", 1)[1].split("</think>")[0]

    task = tasks.get("chain", signed=True, languages=["en", "el"])
    mix = {"worked": 0.6, "followup": 0.2, "direct": 0.2}
    plain = list(corpus(task, 300, seed=2, mix=mix, preamble=0.0))
    mixed = list(corpus(task, 300, seed=2, mix=mix, preamble=0.0, switch=0.5))
    assert [k for k, _ in plain] == [k for k, _ in mixed]  # the same kinds and problems
    latin, greek = set(LANGUAGE_NAMES["en"]), set(LANGUAGE_NAMES["el"])
    switched = worked = 0
    for (kind, before), (_, after) in zip(plain, mixed):
        if kind == "direct":
            assert after == before
            continue
        worked += 1
        think, unswitched = last_think(after), last_think(before)
        assert not (set(unswitched) & latin and set(unswitched) & greek)  # one language without switch
        assert after.replace(think, unswitched) == before  # only the reasoning changed
        if think == unswitched:
            continue
        switched += 1
        letters = [c for c in think if c in latin | greek]
        mine = latin if letters[0] in latin else greek  # starts in the problem's language
        k = next(i for i, c in enumerate(letters) if c not in mine)
        assert k >= 1 and all(c not in mine for c in letters[k:])  # and switches for good
        assert re.sub(r"[^\d=:,. +-]", "", think) == re.sub(r"[^\d=:,. +-]", "", unswitched)  # same values, steps
    assert 0.35 * worked <= switched <= 0.65 * worked, (switched, worked)


@pytest.mark.parametrize(
    "task, switch, message",
    [
        (("chain", {"languages": ["en", "el"]}), 1.5, r"switch share 1.5 must be in \[0, 1\]"),
        (("chain", {"languages": ["en", "el"]}), -0.5, r"switch share -0.5"),
        (("chain", {}), 0.5, r"switch share 0.5 needs a task of two languages .* task 'chain' has \['en'\]"),
        (("arith", {}), 0.2, r"switch share 0.2 needs a task of two languages .* task 'arith' has \[\]"),
    ],
)
def test_corpus_bad_switch(task, switch, message):
    with pytest.raises(NanoseekError, match=message):
        list(corpus(tasks.get(task[0], **task[1]), 10, switch=switch))
