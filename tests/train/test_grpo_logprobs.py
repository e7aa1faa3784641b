"""GRPO's completion log-probs (each prompt run once, its latent cache shared by its group)
equal those of the whole sequences, values and gradients."""

from types import SimpleNamespace

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.data.corpus import corpus
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.tasks import get
from nanoseek.train.grpo import GRPOConfig, GRPOTrainer


@pytest.fixture(scope="module")
def trainer():
    tokenizer = train_tokenizer((text for _, text in corpus(get("arith"), 300, seed=0)), vocab_size=320)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny").replace(vocab_size=tokenizer.vocab_size)).train()
    return GRPOTrainer(
        model,
        tokenizer,
        lambda prompts, completions, **_: [0.0] * len(completions),
        ["1+1"],
        GRPOConfig(group_size=3, prompts_per_step=3, max_new_tokens=8),
    )


def test_shared_prompt_logprobs_equal_whole_sequences(trainer):
    g = torch.Generator().manual_seed(0)
    prompt_ids = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 9, 2)]
    lengths = [[4, 1, 7], [6, 6, 3], [2, 8, 5]]
    completions = [
        [SimpleNamespace(token_ids=torch.randint(3, 300, (n,), generator=g).tolist()) for n in group]
        for group in lengths
    ]
    prompts, prompt_lens, comp, group, mask = trainer.batch_tensors(prompt_ids, completions, [0, 2, 1])
    rows = slice(2, 8)  # a micro-batch that splits the first and last groups
    model = trainer.model

    model.zero_grad()
    lp, ent = trainer.completion_logprobs(model, prompts, prompt_lens, comp[rows], group[rows], with_entropy=True)
    (lp * mask[rows]).sum().backward()
    shared_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    total = 0.0
    for r, row in enumerate(range(8)[rows]):
        p = prompt_ids[[0, 2, 1][int(group[row])]]
        c = comp[row, : int(mask[row].sum())].tolist()
        full_lp, full_ent = trainer.logprobs(model, torch.tensor([p + c]), with_entropy=True)
        n = len(c)
        torch.testing.assert_close(lp[r, :n], full_lp[0, len(p) - 1 :].detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(ent[r, :n], full_ent[0, len(p) - 1 :].detach(), atol=1e-5, rtol=0)
        total = total + full_lp[0, len(p) - 1 :].sum()
    total.backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(shared_grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
