"""The dense student (`model: {preset: student}`, the Qwen2 layout) through pretraining, SFT and
GRPO: the loss falls, the export is a Qwen2 directory that transformers and the engine open, a
resumed run is exact, and what does not apply to a dense model (FP8, experts) is refused."""

import json

import pytest
import torch
from safetensors.torch import load_file

from nanoseek.dense import DENSE_PRESETS, DenseTransformer
from nanoseek.errors import NanoseekError
from nanoseek.io.hf import load_pretrained
from nanoseek.train import checkpoint as ckpt
from nanoseek.train.config import load_config
from nanoseek.train.grpo import GRPORunConfig, run
from nanoseek.train.metrics import read_metrics

from train_support import FAST, data_args, losses, make_data, run_cli, train_here

STUDENT = ["model.preset=student", "lr=1e-2", "min_lr=1e-3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def student(tmp_path_factory, data):
    """The student pretrained for 8 steps: (its run directory, the summary)."""
    out = tmp_path_factory.mktemp("student") / "run"
    summary = train_here(out, [*data_args(data), *STUDENT, *FAST, "steps=8"])
    return out, summary


def test_pretraining_the_student_lowers_the_loss_and_exports_qwen2(student, data):
    out, summary = student
    assert summary["loss_last"] < summary["loss_first"] - 0.5, summary
    config = json.loads((out / "hf" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    # the preset's shape, with the tokenizer's vocabulary and special ids
    from nanoseek.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(data[1])
    assert config["vocab_size"] == len(tokenizer) != DENSE_PRESETS["student"]["vocab_size"]
    assert config["eos_token_id"] == tokenizer.eos_id
    assert config["hidden_size"] == DENSE_PRESETS["student"]["hidden_size"]
    record = read_metrics(out / "metrics.jsonl")[-1]
    assert record["loss_mtp"] == [] and record["balance_loss"] == 0.0 and "expert_load" not in record
    # the export holds the last checkpoint's weights
    final = ckpt.read_checkpoint(ckpt.list_checkpoints(out)[-1]).model
    model = load_pretrained(out / "hf")
    assert isinstance(model, DenseTransformer)
    assert model.state_dict().keys() == final.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, final[k]), k


def test_the_export_opens_in_transformers_and_the_engine(student):
    transformers = pytest.importorskip("transformers")
    from nanoseek.infer import Engine, SamplingParams

    hf = student[0] / "hf"
    ours = load_pretrained(hf)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    ids = torch.randint(3, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=0, atol=1e-4)
    engine = Engine.from_pretrained(hf, max_batch_size=2, max_seq_len=64)
    out = engine.generate(["1+2=", "3*4="], SamplingParams(temperature=0, max_tokens=6, min_tokens=6))
    assert [len(o.outputs[0].token_ids) for o in out] == [6, 6]
    prompt = engine.tokenizer.encode("1+2=", bos=True)
    greedy = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            greedy.append(int(ours(torch.tensor([greedy]))[0, -1].argmax()))
    assert out[0].outputs[0].token_ids == greedy[len(prompt) :]


def test_resuming_the_student_is_exact(tmp_path, data):
    """6 steps in one go == 3 steps, stop, then the same command for 6: the same losses and weights."""
    args = [*data_args(data), *STUDENT, *FAST, "checkpoint_every=3"]
    train_here(tmp_path / "straight", [*args, "steps=6"])
    train_here(tmp_path / "split", [*args, "steps=3"])
    train_here(tmp_path / "split", [*args, "steps=6"])
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")
    a = load_file(tmp_path / "straight" / "hf" / "model.safetensors")
    b = load_file(tmp_path / "split" / "hf" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_sft_fine_tunes_the_student(student, tmp_path):
    chats = tmp_path / "chats.jsonl"
    with open(chats, "w") as f:
        for a in range(1, 9):
            turn = {"role": "assistant", "reasoning_content": f"{a}+{a}={2 * a}", "content": str(2 * a)}
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{a}+{a}"}, turn]}) + "\n")
    out = tmp_path / "sft"
    overrides = [f"data.files=[{chats}]", f"init_from={student[0] / 'hf'}", "batch_size=4", "lr=1e-2", "min_lr=1e-3"]
    summary = train_here(
        out, [*overrides, "steps=4", "warmup_steps=1", "log_every=1", "tensorboard=false", "progress=false"], "sft"
    )
    assert summary["steps"] == 4 and summary["loss_last"] < summary["loss_first"], summary
    assert json.loads((out / "hf" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert isinstance(load_pretrained(out / "hf"), DenseTransformer)


def test_grpo_trains_the_student_with_matching_logprobs(student, tmp_path):
    hf = student[0] / "hf"
    cfg = GRPORunConfig(
        init_from=str(hf),
        steps=2,
        prompts=8,
        prompts_per_step=2,
        group_size=4,
        max_new_tokens=8,
        lr=1e-2,
        beta=0.04,
        mu=2,
        tensorboard=False,
        progress=False,
        task_options={"min_ops": 1, "max_ops": 2},
    )
    summary = run(cfg, tmp_path / "grpo")
    assert summary["steps"] == 2
    records = [r for r in read_metrics(tmp_path / "grpo" / "metrics.jsonl") if "event" not in r]
    assert [r["step"] for r in records] == [1, 2]
    # the engine's log-probs (its own cached decode) against the training forward's, float32
    assert all(r["logprob_diff_max"] is not None and r["logprob_diff_max"] < 1e-4 for r in records), records
    assert json.loads((tmp_path / "grpo" / "hf" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert (
        load_file(tmp_path / "grpo" / "hf" / "model.safetensors").keys() == load_file(hf / "model.safetensors").keys()
    )


def test_grpo_completion_logprobs_of_the_student_equal_a_full_forward_and_update_it(student):
    """The prompts' keys and values, run once and shared by their completions, give the same
    log-probs and gradients as each whole sequence run alone; a reward that varies moves the policy."""
    from nanoseek.train.grpo import GRPOConfig, GRPOTrainer

    def reward(prompts, completions, **_):
        return [float(len(c)) for c in completions]

    config = GRPOConfig(group_size=3, prompts_per_step=2, max_new_tokens=6, lr=1e-2, beta=0.04, mu=2)
    trainer = GRPOTrainer(str(student[0] / "hf"), None, reward, ["1+2=", "3*4-1="], config)
    model = trainer.model
    prompt_ids, completions = trainer.rollout(trainer.next_prompts())
    prompts, lens, comp, group, mask = trainer.batch_tensors(prompt_ids, completions, [0, 1])
    lp, _ = trainer.completion_logprobs(model, prompts, lens, comp, group)
    (lp * mask).sum().backward()
    shared = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total = 0
    for i in range(comp.shape[0]):
        p, c = prompt_ids[int(group[i])], [int(t) for t in comp[i][mask[i].bool()]]
        alone, _ = trainer.logprobs(model, torch.tensor([p + c]))
        torch.testing.assert_close(alone[0, len(p) - 1 :], lp[i, : len(c)], rtol=0, atol=1e-5)
        total = total + alone[0, len(p) - 1 :].sum()
    total.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, shared[n], rtol=1e-4, atol=1e-6, msg=n)
    model.zero_grad()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = trainer.step()
    assert metrics["reward_std"] > 0 and metrics["logprob_diff_max"] < 1e-4, metrics
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_a_dense_field_builds_the_student_and_foreign_keys_are_refused(data):
    cfg = load_config(None, [*data_args(data), "model.preset=student", "model.num_key_value_heads=4"])
    mc = cfg.to_model_config()
    assert type(mc).__name__ == "DenseConfig" and mc.num_key_value_heads == 4 and mc.hidden_size == 64
    with pytest.raises(NanoseekError) as e:
        load_config(None, ["model.preset=student", "model.n_routed_experts=4"])
    assert str(e.value) == (
        "--set model.n_routed_experts=4: config key 'model.n_routed_experts': "
        "not a field of the dense preset 'student' (DenseConfig)"
    )
    with pytest.raises(NanoseekError) as e:
        load_config(None, ["model.num_key_value_heads=4"])  # the default preset is DeepSeek's tiny
    assert "'model.num_key_value_heads': not a field of the DeepSeek preset 'tiny' (ModelConfig)" in str(e.value)


def test_unknown_preset_lists_both_kinds():
    with pytest.raises(NanoseekError) as e:
        load_config(None, ["model.preset=huge"])
    assert str(e.value) == (
        "--set model.preset=huge: config key 'model.preset': unknown preset 'huge' "
        "(DeepSeek: tiny, small, v2-lite, v3; dense: " + ", ".join(DENSE_PRESETS) + ")"
    )


@pytest.mark.parametrize(
    "setting, message",
    [
        (
            "precision=fp8",
            "config key 'precision': fp8 is for the DeepSeek model; a dense student trains in fp32 or bf16",
        ),
        ("expert_parallel=true", "config key 'expert_parallel': a dense student has no experts to split across ranks"),
    ],
)
def test_fp8_and_expert_parallel_are_refused_for_the_student(setting, message, student):
    with pytest.raises(NanoseekError) as e:
        load_config(None, ["model.preset=student", setting])
    assert str(e.value) == f"--set {setting}: {message}"
    with pytest.raises(NanoseekError) as e:  # the same for a dense directory to start from
        load_config(None, [f"init_from={student[0] / 'hf'}", setting])
    assert str(e.value).endswith(message)


def test_nanoseek_pretrain_trains_the_student_preset(tmp_path, data):
    r = run_cli("pretrain", "--out", str(tmp_path / "cli"), "--set", *data_args(data), *STUDENT, *FAST, "steps=2")
    assert r.returncode == 0, r.stderr
    from nanoseek.data.tokenizer import Tokenizer
    from nanoseek.dense import DenseConfig, count_dense_parameters

    vocab = len(Tokenizer.from_pretrained(data[1]))
    n = count_dense_parameters(DenseConfig.preset("student").replace(vocab_size=vocab))
    assert f"pretrain: starting; {n / 1e6:.2f}M parameters (dense qwen2)" in r.stderr
    assert json.loads((tmp_path / "cli" / "hf" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
