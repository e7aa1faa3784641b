"""SFT with logit distillation (`distill_kl`): records carrying the teacher's trace train on the
teacher's sampled ids, with a KL term to its top-k log-probs at each of them."""

import json
import math

import pytest
import torch

from nanoseek.data.stream import IGNORE_INDEX, SFTDataset
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.errors import NanoseekError
from nanoseek.train import pretrain
from nanoseek.train.config import load_config
from nanoseek.train.distributed import Context
from nanoseek.train.metrics import read_metrics
from nanoseek.train.pretrain import top_k_kl_sum
from nanoseek.train.sft import ChatBatches

from train_support import FAST, SMALL_MODEL, data_args, make_data, train_here


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def tok(data):
    return Tokenizer.from_pretrained(data[1])


@pytest.fixture(scope="module")
def base(data, tmp_path_factory):
    """A pretrained tiny model (with MTP and one MoE layer) to fine-tune."""
    out = tmp_path_factory.mktemp("base")
    train_here(out, [*data_args(data), *SMALL_MODEL, *FAST, "steps=2"])
    return out / "hf"


def chat(a: int) -> list[dict]:
    turn = {"role": "assistant", "reasoning_content": f"{a}-{a + 1}=-1", "content": "-1"}
    return [{"role": "user", "content": f"{a}-{a + 1}"}, turn]


def answer_ids(tok: Tokenizer, messages: list[dict]) -> list[int]:
    """The last assistant piece encoded as SFT encodes it without a teacher."""
    text, trained = tok.chat_segments(messages, add_generation_prompt=False)[-1]
    assert trained
    return tok.encode(text)


def teacher_pairs(ids: list[int], vocab: int) -> list[list[list[float]]]:
    """A made-up teacher: 0.6 on the sampled id, 0.3 and 0.1 on the next two ids; the last
    position (EOS) gives one pair only, so rows of pairs have different lengths."""
    pairs = [[[t, math.log(0.6)], [(t + 1) % vocab, math.log(0.3)], [(t + 2) % vocab, math.log(0.1)]] for t in ids]
    pairs[-1] = pairs[-1][:1]
    return pairs


def write_rows(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def teacher_rows(tok: Tokenizer, n: int) -> list[dict]:
    rows = []
    for a in range(1, n + 1):
        ids = answer_ids(tok, chat(a))
        rows.append({"messages": chat(a), "teacher": {"token_ids": ids, "top_logprobs": teacher_pairs(ids, len(tok))}})
    return rows


def test_dataset_uses_the_teachers_ids_and_aligns_its_pairs(tok, tmp_path):
    """The teacher sampled '=' and '-' where encoding the text merges them into '=-': the item's
    last piece is the sampled ids, and each position carries the pairs given for it."""
    (merged,) = tok.encode("=-")
    split = tok.encode("=") + tok.encode("-")
    encoded = answer_ids(tok, chat(3))
    assert merged in encoded and len(split) == 2
    at = encoded.index(merged)
    sampled = encoded[:at] + split + encoded[at + 1 :]
    assert tok.decode(sampled) == tok.decode(encoded)  # the same text, other ids
    pairs = [[[t, -0.5 - 0.01 * i], [7, -2.0]] for i, t in enumerate(sampled)]
    pairs[0] = []  # a position without pairs
    path = tmp_path / "chats.jsonl"
    write_rows(
        path, [{"messages": chat(3), "teacher": {"token_ids": sampled, "top_logprobs": pairs}}, {"messages": chat(4)}]
    )

    ds = SFTDataset(path, tok)
    ids, mask, (top_ids, top_logprobs) = ds[0]
    start = len(ids) - len(sampled)
    assert ids[start:] == sampled and ids[start:] != encoded
    assert mask == [0] * start + [1] * len(sampled)
    assert ds.conversations[0] == chat(3)
    assert top_ids.shape == top_logprobs.shape == (len(ids), 2)
    assert torch.isinf(top_logprobs[: start + 1]).all()  # the prompt, and the position given no pairs
    for i in range(1, len(sampled)):
        assert top_ids[start + i].tolist() == [sampled[i], 7]
        assert top_logprobs[start + i].tolist() == pytest.approx([-0.5 - 0.01 * i, -2.0])
    assert ds[1] == SFTDataset([chat(4)], tok)[0]  # a record without a teacher: as before

    x, y, (bx, blp) = ds.collate([ds[1], ds[0]], teacher=True)
    assert x.shape == y.shape == bx.shape[:2] == blp.shape[:2]
    n = len(ids) - 1  # row 1: position t predicts ids[t + 1] with the pairs given for it
    assert y[1, :n].tolist() == [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
    assert torch.equal(bx[1, :n], top_ids[1:]) and torch.equal(blp[1, :n], top_logprobs[1:])
    assert torch.isinf(blp[0]).all() and torch.isinf(blp[1, n:]).all()
    has = torch.isfinite(blp).any(-1)
    assert (y[has] == bx[has][:, 0]).all()  # the teacher's first pair is the sampled id, the target
    assert ds.collate([ds[1], ds[0]])[0].equal(x)  # without teacher=True: (x, y) only
    assert len(ds.collate([ds[1], ds[0]])) == 2

    cut = SFTDataset(path, tok, max_len=start + 5)[0]  # max_len cuts the pairs with the ids
    assert cut[0] == ids[: start + 5] and torch.equal(cut[2][1], top_logprobs[: start + 5])


def test_top_k_kl_equals_a_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11)
    top_ids = torch.randint(0, 11, (2, 3, 3))
    top_logprobs = -torch.rand(2, 3, 3) * 4
    top_logprobs[0, 1] = -math.inf  # no teacher targets here
    top_logprobs[1, 2, 2] = -math.inf  # two pairs only
    total = 0.0
    for b in range(2):
        for t in range(3):
            pairs = [(int(i), float(lp)) for i, lp in zip(top_ids[b, t], top_logprobs[b, t]) if lp > -math.inf]
            if not pairs:
                continue
            z = sum(math.exp(lp) for _, lp in pairs)
            norm = math.log(sum(math.exp(v) for v in logits[b, t].tolist()))
            total += sum(math.exp(lp) / z * (lp - math.log(z) - (logits[b, t, i].item() - norm)) for i, lp in pairs)
    assert top_k_kl_sum(logits, top_ids, top_logprobs).item() == pytest.approx(total, rel=1e-5)
    # the teacher's own distribution, renormalised on its support, costs nothing
    same = torch.full((1, 1, 11), -30.0)
    same[0, 0, :3] = torch.tensor([0.5, 0.3, 0.2]).log()
    kl = top_k_kl_sum(same, torch.tensor([[[0, 1, 2]]]), torch.tensor([[[0.25, 0.15, 0.1]]]).log())
    assert kl.item() == pytest.approx(0.0, abs=1e-5)


def test_train_step_kl_is_the_mean_over_teacher_positions_at_any_micro_batch(tok, base, data, tmp_path):
    path = tmp_path / "chats.jsonl"
    write_rows(path, [*teacher_rows(tok, 3), {"messages": chat(9)}])  # one conversation without a teacher
    cfg = load_config(
        None, [f"data.files=[{path}]", f"init_from={base}", "batch_size=4", "distill_kl=0.5", "data.shuffle=false"]
    )
    run = pretrain.Run(cfg, tmp_path / "out", "sft", Context())
    x, y, teacher = run.next_batch()
    with torch.no_grad():
        logits = run.model.lm_head(run.model.hidden_states(x)).double()
    top_ids, top_logprobs = teacher
    total, n = 0.0, 0
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            pairs = [(int(i), float(lp)) for i, lp in zip(top_ids[b, t], top_logprobs[b, t]) if lp > -math.inf]
            if pairs:
                z = sum(math.exp(lp) for _, lp in pairs)
                log_q = torch.log_softmax(logits[b, t], -1)
                total += sum(math.exp(lp) / z * (lp - math.log(z) - log_q[i].item()) for i, lp in pairs)
                n += 1
    assert n == sum(len(r["teacher"]["token_ids"]) for r in teacher_rows(tok, 3))
    whole = run.train_step(x, y, teacher)
    assert whole["kl"] == pytest.approx(total / n, rel=1e-5)
    run.micro = 1  # gradient accumulation over four micro-batches: the same means
    run.optimizer.zero_grad()
    split = run.train_step(x, y, teacher)
    assert split["kl"] == pytest.approx(whole["kl"], rel=1e-6)
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-6)


def test_sft_with_distill_kl_trains_and_the_kl_falls(tok, base, tmp_path):
    path = tmp_path / "chats.jsonl"
    write_rows(path, teacher_rows(tok, 8))
    args = [f"data.files=[{path}]", f"init_from={base}", "batch_size=4", "micro_batch_size=2", "warmup_steps=1"]
    args += ["log_every=1", "tensorboard=false", "progress=false"]
    out = tmp_path / "kd"
    summary = train_here(out, [*args, "steps=20", "distill_kl=1.0"], stage="sft")
    records = [r for r in read_metrics(out / "metrics.jsonl") if "event" not in r]
    assert len(records) == 20 and all(math.isfinite(r["kl"]) for r in records)
    first, last = sum(r["kl"] for r in records[:3]) / 3, sum(r["kl"] for r in records[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    assert summary["loss_last"] < summary["loss_first"]

    # The term does the work: with a weight too small to train on (the KL only measured), the KL
    # at the end is well above the distilled run's.
    measured = tmp_path / "measured"
    train_here(measured, [*args, "steps=20", "distill_kl=1e-6"], stage="sft")
    tail = [r["kl"] for r in read_metrics(measured / "metrics.jsonl")[-3:]]
    assert last < 0.8 * sum(tail) / 3, (last, tail)

    plain = tmp_path / "plain"  # the same traces without the term: no "kl" logged
    train_here(plain, [*args, "steps=2"], stage="sft")
    assert all("kl" not in r for r in read_metrics(plain / "metrics.jsonl"))


def test_teacher_with_mismatched_lengths_names_the_file_and_record(tok, tmp_path):
    path = tmp_path / "chats.jsonl"
    rows = teacher_rows(tok, 2)
    rows[1]["teacher"]["top_logprobs"].pop()
    write_rows(path, rows)
    n = len(rows[1]["teacher"]["token_ids"])
    with pytest.raises(NanoseekError) as e:
        SFTDataset(path, tok)
    assert str(e.value) == (
        f"{path}: record 2: teacher has {n} token_ids but {n - 1} top_logprobs (one list of pairs per token)"
    )
    rows = teacher_rows(tok, 1)
    rows[0]["teacher"]["top_logprobs"][2][0][1] = float("nan")
    write_rows(path, rows)
    with pytest.raises(
        NanoseekError, match=r"record 1: teacher.top_logprobs\[2\] must be a list of \[token id below 320"
    ):
        SFTDataset(path, tok)


def test_distill_kl_without_teacher_traces_or_outside_sft_is_refused(data, tok, tmp_path):
    path = tmp_path / "chats.jsonl"
    write_rows(path, [{"messages": chat(1)}, {"messages": chat(2)}])
    cfg = load_config(None, [f"data.files=[{path}]", f"data.tokenizer={data[1]}", "distill_kl=0.5"])
    with pytest.raises(NanoseekError) as e:
        ChatBatches(cfg, tok, Context())
    assert str(e.value) == (
        f"config key 'distill_kl': 0.5 distils the teacher's top-k log-probs, but no conversation in {path} has a "
        "'teacher' field (`nanoseek distill` writes them)"
    )
    out = tmp_path / "pretrain"
    with pytest.raises(NanoseekError) as e:
        train_here(out, [*data_args(data), *SMALL_MODEL, *FAST, "steps=1", "distill_kl=0.5"])
    assert str(e.value) == (
        "config key 'distill_kl': logit distillation is for SFT on teacher traces, not pretrain "
        "(set it to 0, or run `nanoseek sft`)"
    )
    assert not out.exists()
    with pytest.raises(NanoseekError, match="config key 'distill_kl': must be at least 0, got -1"):
        load_config(None, ["distill_kl=-1"])
