"""Prompt scoring in the engine: SamplingParams.prompt_logprobs gives each prompt token's
log-probability from the prefill forward pass, equal to a full forward's log-softmax, on the MoE
model (folded or not, speculative or not) and on a dense Qwen2 model; max_tokens 0 scores the
prompt and generates nothing; stream events carry each token's log-prob."""

import pytest
import torch

from dense_support import transformers_model
from infer_support import greedy_reference, make_model, prompts
from nanoseek import NanoseekError
from nanoseek.infer import Engine, SamplingParams


@pytest.fixture(scope="module")
def model():
    return make_model()


def full_forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log pi(ids[i] | ids[:i]) for i >= 1 from one forward over the whole sequence, float32."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, :-1]
    return torch.log_softmax(logits.float(), -1)


def check_prompt_logprobs(model, prompt, scored, n_top):
    want = full_forward_logprobs(model, prompt)
    assert scored.logprobs[0] is None and scored.top_logprobs[0] is None  # nothing before the first token
    assert len(scored.logprobs) == len(scored.top_logprobs) == len(prompt)
    got = torch.tensor(scored.logprobs[1:])
    torch.testing.assert_close(got, want.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0], atol=1e-4, rtol=0)
    for row, top in zip(want, scored.top_logprobs[1:]):
        values, indices = row.topk(n_top)
        assert [t for t, _ in top] == indices.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in top]), values, atol=1e-4, rtol=0)


@pytest.mark.parametrize("speculative, folded", [(False, True), (True, True), (False, False)])
def test_prompt_logprobs_equal_a_full_forward_on_the_moe_model(model, speculative, folded, monkeypatch):
    monkeypatch.setattr("nanoseek.infer.engine.PROMPT_CHUNK", 5)  # several chunks of the output head
    ps = prompts([13, 6, 22], seed=7)
    engine = Engine(model, max_batch_size=2, max_seq_len=64, speculative=speculative, folded=folded)  # one waits
    params = SamplingParams(n=2, temperature=0, max_tokens=3, prompt_logprobs=2, logprobs=1)
    outs = engine.generate(ps, params)
    for p, out in zip(ps, outs):
        check_prompt_logprobs(model, p, out.prompt_logprobs, 2)
        for o in out.outputs:  # the generated tokens' log-probs continue the same sequence
            want = full_forward_logprobs(model, p + o.token_ids)[len(p) - 1 :]
            got = torch.tensor(o.logprobs)
            torch.testing.assert_close(got, want.gather(1, torch.tensor(o.token_ids)[:, None])[:, 0], atol=1e-4, rtol=0)
    assert engine.generate(ps[0], SamplingParams(max_tokens=2))[0].prompt_logprobs is None


def test_max_tokens_0_scores_the_prompt_and_generates_nothing(model):
    engine = Engine(model, max_batch_size=2, max_seq_len=64)
    ps = prompts([9, 4, 15], seed=8)
    outs = engine.generate(ps, SamplingParams(n=2, max_tokens=0, prompt_logprobs=0))
    for p, out in zip(ps, outs):
        assert out.finished and [o.token_ids for o in out.outputs] == [[], []]
        assert [o.finish_reason for o in out.outputs] == ["length", "length"]
        assert out.prompt_logprobs.top_logprobs[1:] == [[] for _ in p[1:]]
        want = full_forward_logprobs(model, p).gather(1, torch.tensor(p[1:])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(out.prompt_logprobs.logprobs[1:]), want, atol=1e-4, rtol=0)
    assert not engine.has_unfinished() and len(engine.free_slots) == 2
    # Beside a request that generates, in one prefill, with MTP drafting for that one.
    speculative = Engine(model, max_batch_size=2, max_seq_len=64, speculative=True)
    scored, made = speculative.generate(
        ps[:2], [SamplingParams(max_tokens=0, prompt_logprobs=0), SamplingParams(temperature=0, max_tokens=6)]
    )
    assert scored.prompt_logprobs.logprobs == pytest.approx(outs[0].prompt_logprobs.logprobs, abs=1e-5)
    assert scored.outputs[0].token_ids == [] and made.outputs[0].token_ids == greedy_reference(model, ps[1], 6)
    events = list(engine.stream(ps[0], SamplingParams(max_tokens=0, prompt_logprobs=1)))
    assert [(e.token_id, e.finish_reason) for e in events] == [(None, "length")]
    assert events[0].prompt_logprobs.logprobs == outs[0].prompt_logprobs.logprobs
    with pytest.raises(NanoseekError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
    with pytest.raises(NanoseekError, match="max_tokens"):
        SamplingParams(max_tokens=-1)


def test_stream_events_carry_each_tokens_logprob(model):
    engine = Engine(model, max_batch_size=2, max_seq_len=64, speculative=True)
    p = prompts([8], seed=9)[0]
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=2, prompt_logprobs=1)
    events = list(engine.stream(p, params))
    out = engine.generate(p, params)[0]
    assert [e.logprob for e in events] == pytest.approx(out.outputs[0].logprobs, abs=1e-5)
    tops = out.outputs[0].top_logprobs
    assert [[t for t, _ in e.top_logprobs] for e in events] == [[t for t, _ in top] for top in tops]
    assert events[0].prompt_logprobs is not None and all(e.prompt_logprobs is None for e in events[1:])


def test_prompt_logprobs_equal_a_full_forward_on_a_dense_model(tmp_path):
    transformers_model("qwen2-gqa2-tied").save_pretrained(tmp_path)
    engine = Engine.from_pretrained(tmp_path, max_batch_size=2, max_seq_len=64)
    ps = [[5, 17, 3, 44, 9, 12, 2], [8, 30, 31], [60, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    outs = engine.generate(ps, SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=3, logprobs=0))
    for p, out in zip(ps, outs):
        check_prompt_logprobs(engine.model, p, out.prompt_logprobs, 3)
        o = out.outputs[0]
        want = full_forward_logprobs(engine.model, p + o.token_ids)[len(p) - 1 :]
        got = torch.tensor(o.logprobs)
        torch.testing.assert_close(got, want.gather(1, torch.tensor(o.token_ids)[:, None])[:, 0], atol=1e-4, rtol=0)
