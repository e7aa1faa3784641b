"""`nanoseek grpo`: the YAML run, its rewards, exact resume and its errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from nanoseek import ModelConfig, Transformer
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.errors import NanoseekError
from nanoseek.io.hf import save_pretrained
from nanoseek.tasks import get
from nanoseek.train.config import load_config
from nanoseek.train.grpo import GRPORunConfig, run, task_prompts, task_rewards

from train_support import make_data, run_cli


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small random model in Hugging Face format with its tokenizer."""
    root = tmp_path_factory.mktemp("grpo")
    _, tok_dir = make_data(root / "data")
    tokenizer = Tokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny").replace(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        moe_intermediate_size=32,
        q_lora_rank=32,
        kv_lora_rank=32,
    )
    model = Transformer(config).eval()
    # A random model never earns the task's rewards; one that often ends early earns DAPO's
    # overlong penalty unevenly, so its groups have advantages and GRPO has something to do.
    with torch.no_grad():
        h = model.hidden_states(torch.randint(3, tokenizer.vocab_size, (8, 32))).reshape(-1, config.hidden_size)
        model.lm_head.weight[tokenizer.special_ids["eos"]] = 2 * h.mean(0) / h.mean(0).norm()
    hf = save_pretrained(model, root / "base")
    tokenizer.save_pretrained(hf)
    return hf


FAST = {
    "prompts": 40,
    "prompts_per_step": 2,
    "group_size": 4,
    "max_new_tokens": 12,
    "lr": 1e-2,
    "tensorboard": False,
    "progress": False,
    "task_options": {"min_ops": 1, "max_ops": 2},
    "rewards": {"accuracy": 1.0, "overlong": 1.0},
    "overlong_buffer": 10,
}


def config(base, **kw) -> GRPORunConfig:
    return GRPORunConfig(init_from=str(base), **{**FAST, **kw})


def weights(out):
    return load_file(out / "hf" / "model.safetensors")


def test_resume_is_exact(base, tmp_path):
    """4 steps in one go == 2 steps, stop, resume for 2 more: the same weights and metrics."""
    run(config(base, steps=4, checkpoint_every=2, beta=0.04, mu=2), tmp_path / "straight")
    run(config(base, steps=2, checkpoint_every=2, beta=0.04, mu=2), tmp_path / "split")
    run(config(base, steps=4, checkpoint_every=2, beta=0.04, mu=2), tmp_path / "split")  # resumes at step 2
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    drop = ("gen_seconds", "train_seconds", "elapsed_s")  # wall clock; tokens and flops must match

    def records(out):
        return [
            {k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (out / "metrics.jsonl").read_text().splitlines()
        ]

    assert records(tmp_path / "straight") == records(tmp_path / "split")
    assert [r["step"] for r in records(tmp_path / "split")] == [1, 2, 3, 4]
    assert any(r["all_equal_groups"] < 1 for r in records(tmp_path / "split"))  # something was learned from
    assert {p.name for p in (tmp_path / "split").glob("*.png")} == {"reward.png", "length.png", "kl_entropy.png"}
    # the run moved the weights away from the base model
    base_w = load_file(base / "model.safetensors")
    assert any(not torch.equal(a[n], base_w[n]) for n in a if n in base_w)


def test_resume_refuses_a_changed_config_and_keeps_the_checkpoint(base, tmp_path):
    out = tmp_path / "run"
    run(config(base, steps=2, checkpoint_every=1), out)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(NanoseekError, match="different config: lr"):
        run(config(base, steps=4, lr=5e-3), out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    (out / "checkpoints" / before[-1] / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(NanoseekError, match="model.safetensors"):
        run(config(base, steps=4), out)


def test_task_rewards_score_real_completions():
    task = get("arith")
    problem = task.sample(1, "test", seed=3)[0]
    right = f" <think>{problem.solution}</think> <answer>{problem.answer}</answer>"
    wrong = f" <think></think> <answer>{int(problem.answer) + 1}</answer>"
    unformatted = f" <answer>{problem.answer}</answer>"  # right, but no reasoning block
    reward_fn, metrics_fn = task_rewards(task, {"accuracy": 1.0, "format": 0.1}, tokenizer=None, max_tokens=64)
    rows = task_prompts(task, [problem] * 3, "Q: {prompt}\nA:")
    assert rows[0]["prompt"] == f"Q: {problem.prompt}\nA:"
    completions = [right, wrong, unformatted]
    problems = [r["problem"] for r in rows]
    assert reward_fn([r["prompt"] for r in rows], completions, problem=problems) == pytest.approx([1.1, 0.1, 1.0])
    assert metrics_fn(None, completions, problem=problems) == {
        "accuracy": [1.0, 0.0, 1.0],
        "format": [1.0, 1.0, 0.0],
        "reflection": [0.0, 0.0, 0.0],
        "reflection_accuracy": [None, None, None],
        "no_reflection_accuracy": [1.0, 0.0, 1.0],
    }


def test_config_errors_name_the_key(base, tmp_path):
    f = tmp_path / "g.yaml"
    f.write_text(f"init_from: {base}\ngroup_size: 1\n")
    with pytest.raises(NanoseekError, match="g.yaml: config key 'group_size': must be at least 2, got 1"):
        load_config(f, cls=GRPORunConfig)
    with pytest.raises(NanoseekError, match="unknown config key 'gruop_size'"):
        load_config(None, [f"init_from={base}", "gruop_size=4"], cls=GRPORunConfig)
    with pytest.raises(NanoseekError, match="'rewards': unknown speed"):
        load_config(None, [f"init_from={base}", "rewards={speed: 1.0}"], cls=GRPORunConfig)
    with pytest.raises(NanoseekError, match="'init_from'"):
        load_config(None, [], cls=GRPORunConfig)
    with pytest.raises(NanoseekError, match="needs a {prompt} field"):
        load_config(None, [f"init_from={base}", "template=no field"], cls=GRPORunConfig)


def test_cli_runs_and_fails_with_one_line(base, tmp_path):
    sets = [
        f"init_from={base}",
        "steps=1",
        "prompts=8",
        "prompts_per_step=2",
        "group_size=2",
        "max_new_tokens=6",
        "tensorboard=false",
        "progress=false",
    ]
    done = run_cli("grpo", "--out", str(tmp_path / "cli"), "--set", *sets)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cli" / "hf" / "tokenizer.json").exists()
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert summary["steps"] == 1
    record = json.loads((tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["flops"] == record["flops"] > 0 and summary["tokens"] == record["tokens"] > 0
    bad = run_cli("grpo", "--out", str(tmp_path / "bad"), "--set", *sets, "loss_type=ppo")
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "--set loss_type=ppo: config key 'loss_type'" in bad.stderr
    assert "Traceback" not in bad.stderr
