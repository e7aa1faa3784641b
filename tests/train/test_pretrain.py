"""The training loop: aux-loss-free balancing, the loss-spike guard, outputs, SFT."""

import json
import math

import pytest
import torch

from nanoseek import cost, storage
from nanoseek.config import ModelConfig
from nanoseek.data.stream import IGNORE_INDEX
from nanoseek.errors import NanoseekError
from nanoseek.io.hf import load_pretrained
from nanoseek.train import checkpoint as ckpt
from nanoseek.train import pretrain
from nanoseek.train.metrics import read_metrics
from nanoseek.train.pretrain import SpikeGuard

from model_support import balance_by_hand, record_moe_inputs
from train_support import FAST, SMALL_MODEL, data_args, make_data, train_here


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def test_bias_update_lowers_expert_load_imbalance(tmp_path, data):
    """V3's auxiliary-loss-free balancing: with the bias step (and no balance loss) the max /
    mean expert load over the last steps is lower than without it."""

    def imbalance(gamma):
        out = tmp_path / f"gamma{gamma}"
        train_here(
            out,
            [
                *data_args(data),
                *SMALL_MODEL,
                *FAST,
                "steps=30",
                "checkpoint_every=100",
                "balance_alpha=0",
                f"bias_gamma={gamma}",
            ],
        )
        records = read_metrics(out / "metrics.jsonl")
        return sum(r["expert_load"][0] for r in records[-10:]) / 10

    without, with_bias = imbalance(0.0), imbalance(0.01)
    assert with_bias < 0.8 * without, (with_bias, without)


def test_spike_guard_decisions():
    g = SpikeGuard(factor=2.0, warmup=3, rollback_after=2)
    assert [g.check(x) for x in (5.0, 4.0, 3.0)] == ["ok"] * 3
    assert g.check(100.0) == "skip"  # far above the running mean
    assert g.check(3.0) == "ok"  # a good loss resets the count
    assert g.check(float("nan")) == "skip"
    assert g.check(float("inf")) == "rollback"
    state = g.state_dict()
    json.dumps(state)
    h = SpikeGuard(factor=2.0, warmup=3, rollback_after=2)
    h.load_state_dict(state)
    assert h.check(50.0) == g.check(50.0) == "skip"


def test_spikes_skip_then_roll_back(tmp_path, data, monkeypatch):
    """Calls 6, 9, 10 and 11 of the step see a non-finite loss: 6, 9 and 10 are skipped, the
    third in a row (11) rolls back to the checkpoint of step 8; the run then finishes."""
    real = pretrain.Run.train_step
    calls = []

    def spiky(self, x, y):
        result = real(self, x, y)
        calls.append(self.step + 1)
        if len(calls) in (6, 9, 10, 11):
            result["loss"] = float("nan")
        return result

    monkeypatch.setattr(pretrain.Run, "train_step", spiky)
    out = tmp_path / "run"
    summary = train_here(out, [*data_args(data), *SMALL_MODEL, *FAST, "steps=12", "checkpoint_every=4"])
    records = read_metrics(out / "metrics.jsonl")
    events = [(r["step"], r["event"]) for r in records if "event" in r]
    assert events == [(6, "spike_skipped"), (9, "spike_skipped"), (10, "spike_skipped"), (11, "rollback")]
    assert [r for r in records if r.get("event") == "rollback"][0]["to_step"] == 8
    assert calls[-4:] == [9, 10, 11, 12]  # steps 9.. again after the rollback, on new batches
    assert summary["steps"] == 12 and all(math.isfinite(r["loss"]) for r in records if "event" not in r)


def test_outputs_and_hf_export(tmp_path, data):
    out = tmp_path / "run"
    summary = train_here(
        out, [*data_args(data), *SMALL_MODEL, *FAST, "steps=8", "checkpoint_every=4", "tensorboard=true", "log_every=2"]
    )
    assert summary["loss_last"] < summary["loss_first"]
    for name in (
        "metrics.jsonl",
        "config.yaml",
        "summary.json",
        "loss.png",
        "lr.png",
        "expert_load.png",
        "hf/config.json",
        "hf/model.safetensors",
        "hf/tokenizer.json",
    ):
        assert (out / name).exists(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    record = read_metrics(out / "metrics.jsonl")[-1]
    assert {"step", "loss", "loss_mtp", "lr", "expert_load", "tokens_per_s", "flops"} <= set(record)
    # FLOPs: the tokens so far x nanoseek.cost's count for 64-token rows, the MTP module's loss on.
    per_token = cost.flops_per_token(ModelConfig.from_hf(out / "hf"), 64)
    assert per_token > cost.flops_per_token(ModelConfig.from_hf(out / "hf"), 64, mtp=False)
    records = [r for r in read_metrics(out / "metrics.jsonl") if "event" not in r]
    assert [r["flops"] for r in records] == [r["tokens"] * per_token for r in records]
    assert summary["flops"] == summary["tokens"] * per_token == 8 * 8 * 64 * per_token
    # The HF export holds the trained weights, routing biases included.
    model = load_pretrained(out / "hf")
    from nanoseek.train.checkpoint import list_checkpoints, read_checkpoint

    final = read_checkpoint(list_checkpoints(out)[-1]).model
    # Every gate's bias moved from zero, the MTP module's too (its MoE routes and balances like the rest).
    biases = [k for k in final if k.endswith("e_score_correction_bias")]
    assert sorted(biases) == ["layers.1.mlp.gate.e_score_correction_bias", "mtp.0.mlp.gate.e_score_correction_bias"]
    assert all(final[k].abs().sum() > 0 for k in biases), {k: final[k] for k in biases}
    for k, v in model.state_dict().items():
        assert torch.equal(v, final[k]), k


def test_step_balance_loss_and_loads_count_the_mtp_module(tmp_path, data):
    """One training step: its balance loss is the sum of V3's sequence-wise loss of both MoE
    layers, the main model's and the MTP module's, and its loads hold a row for each; with
    the MTP loss off, the MTP module does not run and its row is zeros."""
    from nanoseek.train.config import load_config
    from nanoseek.train.distributed import Context

    for mtp_lambda in (0.3, 0.0):
        cfg = load_config(None, [*data_args(data), *SMALL_MODEL, *FAST, f"mtp_lambda={mtp_lambda}"])
        run = pretrain.Run(cfg, tmp_path / f"run{mtp_lambda}", "pretrain", Context())
        assert [name for name, _ in run.model.named_moe_layers()] == ["layer 1", "MTP 1"]
        inputs = record_moe_inputs(run.model)
        x, y = run.next_batch()
        result = run.train_step(x, y)
        tokens = x.shape[0] * run.model_config.num_experts_per_tok
        if mtp_lambda:
            expected = {name: balance_by_hand(moe, inputs[name]) for name, moe in run.model.named_moe_layers()}
            assert result["balance"] == pytest.approx(expected["layer 1"] + expected["MTP 1"], rel=1e-5)
            assert expected["MTP 1"] > 0.5
            assert result["loads"].sum(1).tolist() == [tokens * cfg.seq_len, tokens * (cfg.seq_len - 1)]
        else:
            assert "MTP 1" not in inputs
            layer = run.model.moe_layers()[0]
            assert result["balance"] == pytest.approx(balance_by_hand(layer, inputs["layer 1"]), rel=1e-5)
            assert result["loads"].sum(1).tolist() == [tokens * cfg.seq_len, 0]


def test_sft_trains_on_assistant_tokens_only(tmp_path, data):
    base = tmp_path / "base"
    train_here(base, [*data_args(data), *SMALL_MODEL, *FAST, "steps=2"])
    chats = tmp_path / "chats.jsonl"
    with open(chats, "w") as f:
        for a in range(1, 9):
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"{a}+{a}"},
                            {"role": "assistant", "reasoning_content": f"{a}+{a}={2 * a}", "content": str(2 * a)},
                        ]
                    }
                )
                + "\n"
            )

    from nanoseek.train.config import load_config
    from nanoseek.train.distributed import Context
    from nanoseek.train.sft import ChatBatches

    cfg = load_config(None, [f"data.files=[{chats}]", f"init_from={base / 'hf'}", "batch_size=4"])
    x, y = next(ChatBatches(cfg, pretrain.load_tokenizer(cfg), Context()))
    assert x.shape[0] == 4 and (y == IGNORE_INDEX).any() and (y != IGNORE_INDEX).any()
    tokenizer = pretrain.load_tokenizer(cfg)
    trained = tokenizer.decode(y[0][y[0] != IGNORE_INDEX].tolist())
    assert "</think>" in trained and "<｜User｜>" not in trained

    out = tmp_path / "sft"
    summary = train_here(
        out,
        [
            f"data.files=[{chats}]",
            f"init_from={base / 'hf'}",
            "steps=4",
            "batch_size=4",
            "log_every=1",
            "tensorboard=false",
            "progress=false",
            "warmup_steps=1",
        ],
        stage="sft",
    )
    assert summary["steps"] == 4 and (out / "hf" / "tokenizer.json").exists()
    assert summary["loss_last"] < summary["loss_first"]


def test_bf16_autocast_runs_close_to_fp32(tmp_path, data):
    first = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        train_here(out, [*data_args(data), *SMALL_MODEL, *FAST, "steps=2", f"precision={precision}"])
        first[precision] = read_metrics(out / "metrics.jsonl")[0]["loss"]
    assert first["bf16"] == pytest.approx(first["fp32"], rel=0.02)


def test_document_mask_changes_the_loss_of_packed_rows_and_trains(tmp_path, data):
    """`document_mask: true` reaches the model: the first step's loss differs from the unmasked
    run on the same rows (each holds several arith documents), and it trains. (That masked rows
    equal their documents run alone is tested in test_model.py.)"""
    losses = {}
    for masked in (False, True):
        out = tmp_path / f"mask{masked}"
        train_here(
            out,
            [
                *data_args(data),
                *SMALL_MODEL,
                *FAST,
                "steps=8",
                "checkpoint_every=100",
                f"document_mask={str(masked).lower()}",
            ],
        )
        records = read_metrics(out / "metrics.jsonl")
        losses[masked] = [r["loss"] for r in records]
    assert losses[True][0] != pytest.approx(losses[False][0], rel=1e-4)
    assert losses[True][-1] < losses[True][0]


def _nonfinite_from(monkeypatch, call: int, what: str = "loss"):
    """From the `call`-th training step on, the loss (or one gradient) is NaN."""
    real = pretrain.Run.train_step
    calls = []

    def poisoned(self, x, y):
        result = real(self, x, y)
        calls.append(self.step + 1)
        if len(calls) >= call:
            if what == "loss":
                result["loss"] = float("nan")
            else:  # a finite loss with a NaN in one gradient
                next(p for p in self.model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(pretrain.Run, "train_step", poisoned)
    return calls


def _all_finite(path):
    c = ckpt.read_checkpoint(path)  # verifies the files
    return not storage.nonfinite_names(c.model) and not storage.nonfinite_names(c.optimizer)


@pytest.mark.parametrize("what, said", [("loss", "the loss is nan"), ("grad", "the gradient norm is nan")])
def test_nonfinite_values_that_outlast_a_rollback_stop_the_run(tmp_path, data, monkeypatch, what, said):
    """NaN from step 6 on: steps 6 and 7 are skipped, 8 rolls back to step 4, and when steps 5, 6
    and 7 are NaN again the run stops naming step 7; only the checkpoint of step 4 is on disk, it
    is intact, and no model was written."""
    _nonfinite_from(monkeypatch, 6, what)
    out = tmp_path / "run"
    with pytest.raises(NanoseekError) as e:
        train_here(out, [*data_args(data), *SMALL_MODEL, *FAST, "steps=12", "checkpoint_every=4"])
    message = str(e.value)
    step4 = ckpt.checkpoints_dir(out) / "step-00000004"
    assert message.startswith(
        f"step 7: {said} (6 steps in a row); also after rolling back to step 4; {step4} is intact; the run stops here"
    ), message
    assert "\n" not in message
    events = [(r["step"], r["event"], r.get("nonfinite")) for r in read_metrics(out / "metrics.jsonl") if "event" in r]
    assert events == [
        (6, "spike_skipped", said),
        (7, "spike_skipped", said),
        (8, "rollback", said),
        (5, "spike_skipped", said),
        (6, "spike_skipped", said),
        (7, "stopped_nonfinite", said),
    ]
    assert ckpt.list_checkpoints(out) == [step4] and _all_finite(step4)
    assert not (out / "hf").exists() and not (out / "summary.json").exists()


def test_nonfinite_values_with_no_checkpoint_stop_the_run(tmp_path, data, monkeypatch):
    _nonfinite_from(monkeypatch, 2)
    out = tmp_path / "run"
    with pytest.raises(NanoseekError) as e:
        train_here(out, [*data_args(data), *SMALL_MODEL, *FAST, "steps=10", "checkpoint_every=100"])
    assert str(e.value).startswith(
        "step 4: the loss is nan (3 steps in a row); no checkpoint to roll back to "
        "(the first is written at step 10); the run stops here"
    ), str(e.value)
    events = [(r["step"], r["event"]) for r in read_metrics(out / "metrics.jsonl") if "event" in r]
    assert events == [(2, "spike_skipped"), (3, "spike_skipped"), (4, "stopped_nonfinite")]
    assert ckpt.list_checkpoints(out) == [] and not (out / "hf").exists()


def test_weights_that_are_not_finite_are_never_written(tmp_path, data, monkeypatch):
    """The update of step 8 leaves a NaN in the weights with a finite loss and gradient: the
    checkpoint of step 8 is not written, the run rolls back to step 4 and finishes; every
    checkpoint and the model are finite."""
    real = pretrain.Run.train_step
    calls = []

    def overflowing(self, x, y):
        result = real(self, x, y)
        calls.append(self.step + 1)
        if len(calls) == 8:
            with torch.no_grad():
                next(self.model.parameters()).view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(pretrain.Run, "train_step", overflowing)
    out = tmp_path / "run"
    summary = train_here(out, [*data_args(data), *SMALL_MODEL, *FAST, "steps=12", "checkpoint_every=4"])
    events = [r for r in read_metrics(out / "metrics.jsonl") if "event" in r]
    assert [(r["step"], r["event"], r.get("to_step"), r.get("nonfinite")) for r in events] == [
        (8, "rollback", 4, "the weights hold NaN or inf")
    ]
    assert summary["steps"] == 12
    found = ckpt.list_checkpoints(out)
    assert [p.name for p in found] == ["step-00000008", "step-00000012"]  # keep_checkpoints 2
    assert all(_all_finite(p) for p in found)
    model = load_pretrained(out / "hf")
    assert not storage.nonfinite_names(model.state_dict())
