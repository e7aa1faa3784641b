"""choose_tokens: draws follow the filtered distribution, one row's draw ignores the rest of the batch."""

import torch

from nanoseek.infer.sampling import SamplingParams, choose_tokens, make_generator


def test_draws_follow_the_distribution_and_never_pick_a_removed_token():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 8000
    logits = probs.log().expand(n, 4)
    params = [SamplingParams(temperature=1.0, top_p=0.9)] * n  # top-p 0.9 removes the last token
    tokens = torch.tensor(choose_tokens(logits, params, [make_generator(3, i) for i in range(n)]))
    counts = torch.bincount(tokens, minlength=4).float()
    assert counts[3] == 0
    expected = probs[:3] / probs[:3].sum() * n
    assert ((counts[:3] - expected).abs() < 4 * expected.sqrt()).all(), counts


def test_a_row_draws_the_same_token_whatever_else_is_in_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    params = [
        SamplingParams(temperature=0.8, seed=1),
        SamplingParams(temperature=0),
        SamplingParams(top_k=5, seed=2),
        SamplingParams(temperature=1.3, top_p=0.5, seed=3),
        SamplingParams(temperature=0),
    ]
    together = choose_tokens(logits, params, [make_generator(p.seed, 0) if p.seed else None for p in params])
    alone = [
        choose_tokens(logits[i : i + 1], [p], [make_generator(p.seed, 0) if p.seed else None])[0]
        for i, p in enumerate(params)
    ]
    assert together == alone
    assert together[1] == logits[1].argmax() and together[4] == logits[4].argmax()
