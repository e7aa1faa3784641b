"""What the inference tests share: a tiny random V3 model (MoE, MTP), random prompts, and
greedy decoding by recomputing the whole sequence (the reference the engine must equal)."""

from __future__ import annotations

import torch

from nanoseek import ModelConfig, Transformer

from model_support import ENGINE_CONFIG, random_model

CONFIG = ENGINE_CONFIG


def make_model(seed=0, **changes) -> Transformer:
    return random_model(ModelConfig(**{**CONFIG, **changes}), seed)


def prompts(lengths, seed=1, vocab=CONFIG["vocab_size"]):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def greedy_reference(model, prompt, max_tokens, eos=1):
    """Greedy decoding by recomputing the whole sequence for every token (on the model's device)."""
    device = next(model.parameters()).device
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(int(model(torch.tensor([ids], device=device))[0, -1].argmax()))
        if ids[-1] == eos:
            break
    return ids[len(prompt) :]
