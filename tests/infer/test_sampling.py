"""choose_tokens: draws follow the filtered distribution, one row's draw ignores the rest of the batch."""

import pytest
import torch

from nanoseek.errors import NanoseekError
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


def _error(logits, params):
    try:
        choose_tokens(logits, params, [make_generator(0, i) for i in range(len(params))])
    except NanoseekError as e:
        return str(e)
    raise AssertionError("no error")


@pytest.mark.parametrize(
    "bad, cause",
    [(float("nan"), "logits are NaN"), (float("inf"), "logits are +inf"), (None, "logits are -inf for every token")],
)
@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_p=0.9)])
def test_logits_that_are_not_finite_name_the_cause(bad, cause, params):
    """A greedy row and a sampled row alike: a NanoseekError naming what the logits hold, not an
    IndexError from searchsorted or a token picked from NaN."""
    logits = torch.randn(1, 8)
    if bad is None:
        logits[:] = float("-inf")
    else:
        logits[0, 3] = bad
    message = _error(logits, [params])
    assert message.startswith(f"sampling: the model's {cause} (batch row 0)"), message


def test_one_bad_row_in_a_batch_is_named():
    logits = torch.randn(4, 8)
    logits[2, 5] = float("nan")
    params = [SamplingParams(temperature=0), SamplingParams(seed=1), SamplingParams(temperature=0), SamplingParams()]
    message = _error(logits, params)
    assert "logits are NaN (batch row 2)" in message, message
    logits[0, 0] = float("inf")
    assert "(batch rows 0, 2)" in _error(logits, params)


def test_a_temperature_that_overflows_the_logits_is_named():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    message = _error(logits, [SamplingParams(temperature=1e-39)])
    assert message.startswith("sampling: temperature 1e-39 is too small: the logits divided by it overflow"), message


@pytest.mark.parametrize("top_p", [1e-10, 1e-46, 1e-300])
def test_a_tiny_top_p_keeps_the_most_likely_token(top_p):
    """top_p below float32's smallest number rounds to 0; the most likely token still stays
    (it was once every token removed, reported as 'temperature 1 is too small')."""
    logits = torch.tensor([[1.0, 3.0, 2.0]]).expand(50, 3)
    params = [SamplingParams(top_p=top_p)] * 50
    assert choose_tokens(logits, params, [make_generator(0, i) for i in range(50)]) == [1] * 50
