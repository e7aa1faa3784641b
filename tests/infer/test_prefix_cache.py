"""The prefix cache (nanoseek.infer.prefix_cache): the engine's output with it equals its output
without it (token ids; log-probs within 1e-5), greedy and seeded sampling, on the MLA model (folded,
unfolded, with MTP speculation) and a dense one, for a multi-turn conversation, a system prompt
shared by requests, a cache too small to keep everything and a prompt that is all cached; the
cached prompt tokens are reported; eviction takes a chain of blocks from its end."""

import copy

import pytest
import torch

from dense_support import config_kwargs, randomize
from infer_support import greedy_reference, make_model, prompts
from nanoseek import NanoseekError
from nanoseek.dense import DenseConfig, DenseTransformer
from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.prefix_cache import BLOCK_SIZE, PrefixCache

KINDS = ["mla", "mla-unfolded", "mla-speculative", "dense"]
GREEDY = SamplingParams(temperature=0, max_tokens=8, min_tokens=8, logprobs=2)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    dense = randomize(DenseTransformer(DenseConfig(**config_kwargs("qwen2-gqa2-tied"), eos_token_id=1)))
    return {"mla": make_model(), "dense": dense}


def engines(models, kind, **kwargs) -> tuple[Engine, Engine]:
    """(with the prefix cache, without it) on the same model."""
    model = models["dense" if kind == "dense" else "mla"]
    kwargs = {"max_batch_size": 4, "max_seq_len": 256, "folded": kind != "mla-unfolded", **kwargs}
    kwargs["speculative"] = kind == "mla-speculative"
    plain = Engine(model, **{**kwargs, "prefix_cache_tokens": 0})
    assert plain.prefix_cache is None
    return Engine(model, **kwargs), plain


def generate(engine, batch, params):
    """engine.generate, then noise in every cache row (all free again): what a later request
    reuses can only come from the prefix cache's own blocks."""
    outs = engine.generate(batch, params)
    for store in engine.stores:
        store.normal_()
    return outs


def ids(models, kind, lengths, seed):
    return prompts(lengths, seed=seed, vocab=models["dense" if kind == "dense" else "mla"].config.vocab_size)


def reused(kind, cached_blocks: int, prompt_len: int) -> int:
    """The prompt tokens the engine takes from `cached_blocks` cached blocks (see Engine._reuse)."""
    n = cached_blocks * BLOCK_SIZE
    return min(n - 1 if kind == "mla-speculative" and n else n, prompt_len - 1)


def assert_same(a, b):
    """Two RequestOutputs: the same tokens, log-probs within 1e-5, the same top tokens."""
    assert len(a.outputs) == len(b.outputs)
    for x, y in zip(a.outputs, b.outputs):
        assert x.token_ids == y.token_ids and x.finish_reason == y.finish_reason
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)
        for p, q in zip(x.top_logprobs, y.top_logprobs):
            assert [t for t, _ in p] == [t for t, _ in q]
            torch.testing.assert_close(
                torch.tensor([v for _, v in p]), torch.tensor([v for _, v in q]), atol=1e-5, rtol=0
            )


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_a_multi_turn_conversation_equals_recomputing_it(models, kind, sampled):
    cached, plain = engines(models, kind)
    params = (
        SamplingParams(temperature=1.0, seed=7, n=2, max_tokens=12, min_tokens=12, logprobs=2) if sampled else GREEDY
    )
    history: list[int] = []
    stored = 0  # tokens of the conversation whose cache is kept: all but the last reply's last token
    for turn, user in enumerate(ids(models, kind, [21, 9, 14, 5, 30], seed=3)):
        prompt = history + user
        a, b = generate(cached, [prompt], params)[0], plain.generate([prompt], params)[0]
        assert_same(a, b)
        assert b.num_cached_tokens == 0
        assert a.num_cached_tokens == (reused(kind, stored // BLOCK_SIZE, len(prompt)) if turn else 0)
        history = prompt + a.outputs[0].token_ids  # the next turn goes on from the first sample
        stored = len(history) - 1
    assert a.num_cached_tokens >= 64  # the fifth turn: most of its 138-token prompt
    assert not cached.has_unfinished() and len(cached.free_slots) == 4


@pytest.mark.parametrize("kind", KINDS)
def test_a_shared_system_prompt_is_prefilled_once(models, kind):
    cached, plain = engines(models, kind, max_seq_len=64)
    system = ids(models, kind, [40], seed=4)[0]
    users = ids(models, kind, [10, 3, 12], seed=5)
    a = generate(cached, [system + users[0]], GREEDY)[0]
    assert_same(a, plain.generate([system + users[0]], GREEDY)[0])
    assert a.num_cached_tokens == 0
    # Two requests on the system prompt (32 of its tokens are two whole blocks) beside a new prompt
    # of 45 tokens: in one prefill, the cached rows start at 32 and their padding runs past the cache.
    batch = [system + u for u in users[1:]] + ids(models, kind, [45], seed=6)
    for a, b, hit in zip(generate(cached, batch, GREEDY), plain.generate(batch, GREEDY), [2, 2, 0]):
        assert_same(a, b)
        assert a.num_cached_tokens == reused(kind, hit, len(a.prompt_token_ids))
    events = list(cached.stream([system + users[0]], GREEDY))  # the first request's prompt, again
    assert [e.token_id for e in events] == plain.generate([system + users[0]], GREEDY)[0].outputs[0].token_ids
    assert {e.num_cached_tokens for e in events} == {reused(kind, 3, 50)}  # its reply made the third block


@pytest.mark.parametrize("kind", KINDS)
def test_a_tiny_cache_evicts_the_least_recent_and_stays_exact(models, kind):
    cached, plain = engines(models, kind, max_seq_len=64, prefix_cache_tokens=2 * BLOCK_SIZE + 5)
    assert cached.prefix_cache.capacity == 2  # whole blocks
    a, b = ids(models, kind, [40, 40], seed=8)
    hits = []
    for p in (a, a, b, a, a):  # b takes both blocks from a; a takes them back
        out = generate(cached, [p], GREEDY)[0]
        assert_same(out, plain.generate([p], GREEDY)[0])
        hits.append(out.num_cached_tokens)
        assert cached.prefix_cache.tokens == 2 * BLOCK_SIZE
    assert hits == [0, reused(kind, 2, 40), 0, 0, reused(kind, 2, 40)]


@pytest.mark.parametrize("kind", KINDS)
def test_a_prompt_all_cached_recomputes_its_last_token(models, kind):
    cached, plain = engines(models, kind, max_seq_len=64)
    p = ids(models, kind, [2 * BLOCK_SIZE], seed=9)[0]
    params = SamplingParams(temperature=0.9, seed=3, n=3, max_tokens=6, logprobs=1)
    for prompt, want in ((p, 0), (p, 2 * BLOCK_SIZE - 1), (p[:20], reused(kind, 1, 20))):
        a = generate(cached, [prompt], params)[0]
        assert_same(a, plain.generate([prompt], params)[0])
        assert a.num_cached_tokens == want
    if kind == "mla":
        assert generate(cached, [p], GREEDY)[0].outputs[0].token_ids == greedy_reference(models["mla"], p, 8)


def test_changed_weights_empty_the_cache():
    model = make_model(seed=2)
    engine = Engine(model, max_batch_size=2, max_seq_len=64)
    p = prompts([40], seed=10)[0]
    assert [engine.generate([p], GREEDY)[0].num_cached_tokens for _ in range(2)] == [0, 32]
    with torch.no_grad():
        model.embed_tokens.weight.mul_(1.5)  # in place, as an optimizer step
    out = engine.generate([p], GREEDY)[0]
    assert out.num_cached_tokens == 0
    assert_same(out, Engine(copy.deepcopy(model), max_batch_size=2, max_seq_len=64).generate([p], GREEDY)[0])


def test_prompt_logprobs_score_every_token_and_bad_sizes_are_refused(models):
    model = models["mla"]
    cached, plain = Engine(model, max_seq_len=64), Engine(model, max_seq_len=64, prefix_cache_tokens=0)
    p = prompts([40], seed=11)[0]
    generate(cached, [p], GREEDY)
    scored = SamplingParams(max_tokens=0, prompt_logprobs=1)
    a, b = generate(cached, [p], scored)[0], plain.generate([p], scored)[0]
    assert a.num_cached_tokens == 0  # every prompt position's hidden state is needed
    torch.testing.assert_close(
        torch.tensor(a.prompt_logprobs.logprobs[1:]), torch.tensor(b.prompt_logprobs.logprobs[1:])
    )
    assert cached.prefix_cache.capacity == 4 * 64 // BLOCK_SIZE  # the default: four contexts
    for bad in (5, -1):
        with pytest.raises(
            NanoseekError, match=rf"^prefix_cache_tokens {bad}: expected 0 \(no prefix cache\) or at least"
        ):
            Engine(model, max_seq_len=64, prefix_cache_tokens=bad)


def test_eviction_takes_a_chain_from_its_end():
    store = torch.arange(2 * 64, dtype=torch.float32).view(1, 2, 64, 1)  # [layers, rows, positions, width]
    cache = PrefixCache([store], tokens=3 * 16, block_size=16)
    a, b, c = list(range(100, 148)), list(range(200, 216)), list(range(300, 316))
    cache.save(0, a, 47)  # two whole blocks of the 47 tokens
    cache.save(1, b, 16)
    assert cache.tokens == 48
    cache.save(1, a, 48)  # a's third block: b was the least recent
    assert cache.match(b, 16) == [] and len(cache.match(a, 48)) == 3
    cache.save(1, c, 16)  # full: a's last block goes, never its first
    assert len(cache.match(a, 48)) == 2 and len(cache.match(c, 16)) == 1
    store[0, 1] = -1
    cache.load(1, cache.match(a, 48))
    assert torch.equal(store[0, 1, :32], store[0, 0, :32]) and (store[0, 1, 32:] == -1).all()
    assert cache.match(a[:16] + [0] * 16, 32) == cache.match(a, 16)  # keys name the whole prefix
    assert cache.match([0] * 16 + a[16:32], 32) == []
