"""GRPO on any device and dtype: a bfloat16 policy on the CPU, the run config's `device` and
`dtype` keys, and (marked `cuda`, skipped without a GPU) one step on CUDA."""

from types import SimpleNamespace

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.data.corpus import corpus
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.device import place_model
from nanoseek.errors import NanoseekError
from nanoseek.tasks import get
from nanoseek.train.grpo import GRPOConfig, GRPORunConfig, GRPOTrainer
from nanoseek.train.grpo_loss import group_advantages


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer((text for _, text in corpus(get("arith"), 300, seed=0)), vocab_size=320)


def make_trainer(tokenizer, device="cpu", dtype=torch.float32, **kw):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny").replace(vocab_size=tokenizer.vocab_size)).eval()
    place_model(model, torch.device(device), dtype)
    reward = lambda prompts, completions, **cols: [float("7" in c) for c in completions]  # noqa: E731
    prompts = [{"prompt": f"Compute {a}+{b}:", "answer": str(a + b)} for a in range(5) for b in range(5)]
    cfg = GRPOConfig(group_size=4, prompts_per_step=2, max_new_tokens=8, lr=1e-2, **kw)
    return GRPOTrainer(model, tokenizer, reward, prompts, cfg)


def check_update_and_step(trainer, tokenizer, dtype):
    """The update favours the rewarded completion, then a whole step (rollout included) runs;
    the weights keep their dtype and the routing bias stays float32."""
    device = next(trainer.model.parameters()).device
    prompt = [tokenizer.encode("Compute 3+4:")]
    good, bad = tokenizer.encode(" <answer>7</answer>"), tokenizer.encode(" <answer>5</answer>")
    group = [[SimpleNamespace(token_ids=good), SimpleNamespace(token_ids=bad)] * 2]

    def margin():
        lp = []
        for ids in (good, bad):
            with torch.no_grad():
                x, _ = trainer.logprobs(trainer.model, torch.tensor([prompt[0] + ids], device=device))
            lp.append(x[0, len(prompt[0]) - 1 :].float().sum().item())
        return lp[0] - lp[1]

    before = margin()
    trainer.update(prompt, group, group_advantages(torch.tensor([[1.0, 0.0, 1.0, 0.0]])), keep=[0])
    assert margin() > before + 0.1
    metrics = trainer.step()
    assert metrics["step"] == 1 and metrics["completion_len_mean"] > 0
    assert {p.dtype for p in trainer.model.parameters()} == {dtype}
    assert trainer.model.moe_layers()[0].gate.e_score_correction_bias.dtype == torch.float32
    assert trainer.engine.latents.device == device and trainer.engine.latents.dtype == dtype


def test_bf16_policy_on_the_cpu(tokenizer):
    check_update_and_step(make_trainer(tokenizer, dtype=torch.bfloat16, beta=0.04), tokenizer, torch.bfloat16)


def test_run_config_device_and_dtype_keys(tmp_path):
    ok = GRPORunConfig(init_from=str(tmp_path), device="cpu", dtype="bfloat16")
    assert (ok.device, ok.dtype) == ("cpu", "bfloat16")
    fields = GRPORunConfig.model_fields
    assert (fields["device"].default, fields["dtype"].default) == ("auto", "float32")
    cases = [
        (
            {"dtype": "float16", "device": "cpu"},
            "config key 'dtype': float16 runs on a GPU only; on the CPU use bfloat16 or float32",
        ),
        ({"dtype": "half"}, "config key 'dtype': must be one of 'float32', 'bfloat16', 'float16', got 'half'"),
        ({"device": "gpu"}, "config key 'device': 'gpu' is not one of auto, cpu, cuda (or cuda:N)"),
    ]
    if not torch.cuda.is_available():
        cases.append(({"device": "cuda"}, "config key 'device': cuda was asked for, but torch sees no GPU"))
    for kw, message in cases:
        with pytest.raises(NanoseekError) as e:
            GRPORunConfig(init_from=str(tmp_path), **kw)
        assert str(e.value) == message


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_step_on_cuda(tokenizer, dtype):
    check_update_and_step(make_trainer(tokenizer, "cuda", dtype, beta=0.04, mu=2), tokenizer, dtype)
