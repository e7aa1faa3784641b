"""The DeepSeek-V3 model: MLA paths, latent cache, MoE routing, MTP, sizes."""

import math

import pytest
import torch
import torch.nn.functional as F

from nanoseek import ModelConfig, Transformer
from nanoseek.errors import NanoseekError
from nanoseek.model import LatentCache, count_parameters, document_mask, kv_cache_bytes_per_token, rope_frequencies

from model_support import balance_by_hand, random_model, record_moe_inputs

YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


def tiny(**kw) -> ModelConfig:
    return ModelConfig.preset("tiny").replace(**kw)


@pytest.mark.parametrize("kw", [{}, {"q_lora_rank": None}, {"rope_scaling": YARN}, {"rope_interleave": False}])
def test_naive_and_absorbed_attention_agree(kw):
    model = random_model(tiny(**kw), norms=False)
    x = torch.randint(0, 512, (3, 17))
    with torch.no_grad():
        naive = model(x, impl="naive")
        absorbed = model(x, impl="absorb")
    assert (naive - absorbed).abs().max().item() < 1e-5


def test_incremental_decoding_over_the_latent_cache_matches_full_forward():
    config = tiny(rope_scaling=YARN)
    model = random_model(config, norms=False)
    x = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        full = model(x)
        for impl in ("naive", "absorb"):
            cache = LatentCache.empty(config, batch=2, max_len=16)
            steps = [model(x[:, :5], positions=torch.arange(5).expand(2, 5), cache=cache, impl=impl)]
            for t in range(5, 12):
                steps.append(model(x[:, t : t + 1], positions=torch.full((2, 1), t), cache=cache, impl=impl))
            assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-5, impl


def test_cache_rows_and_mixed_positions():
    """Two sequences of different lengths decode in one batch through their own cache rows."""
    config = tiny()
    model = random_model(config, norms=False)
    a, b = torch.randint(0, 512, (1, 9)), torch.randint(0, 512, (1, 4))
    cache = LatentCache.empty(config, batch=4, max_len=16)
    with torch.no_grad():
        model(a[:, :8], positions=torch.arange(8)[None], cache=cache, rows=torch.tensor([3]))
        model(b[:, :3], positions=torch.arange(3)[None], cache=cache, rows=torch.tensor([1]))
        step = model(
            torch.cat([a[:, 8:], b[:, 3:]]), positions=torch.tensor([[8], [3]]), cache=cache, rows=torch.tensor([3, 1])
        )
        assert (step[0, -1] - model(a)[0, -1]).abs().max() < 1e-5
        assert (step[1, -1] - model(b)[0, -1]).abs().max() < 1e-5


def reference_moe(moe, x):
    """Token by token: the definition the grouped implementation must equal."""
    flat = x.reshape(-1, x.shape[-1])
    weights, indices, _ = moe.gate(flat)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for w, e in zip(weights[t], indices[t]):
            out[t] += w * moe.experts[int(e)](flat[t])
    out = out.view_as(x)
    return out + moe.shared_experts(x) if moe.shared_experts is not None else out


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False},
        {"topk_method": "group_limited_greedy", "scoring_func": "softmax"},
        {"n_shared_experts": 0},
    ],
)
def test_grouped_experts_equal_per_token_computation(kw):
    model = random_model(tiny(**kw), norms=False)
    moe = model.moe_layers()[0]
    x = torch.randn(2, 7, 128)
    with torch.no_grad():
        assert (moe(x) - reference_moe(moe, x)).abs().max().item() < 1e-5
    assert int(moe.expert_counts.sum()) == 2 * 7 * model.config.num_experts_per_tok


def test_v3_gate_bias_steers_selection_but_not_gate_values():
    config = tiny(n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2, norm_topk_prob=False)
    gate = Transformer(config).moe_layers()[0].gate
    x = torch.randn(64, 128)
    with torch.no_grad():
        w0, i0, s0 = gate(x)
        gate.e_score_correction_bias[5] = 10.0  # expert 5 now always wins selection
        w1, i1, s1 = gate(x)
    assert (i1 == 5).any(dim=1).all() and not (i0 == 5).any(dim=1).all()
    assert torch.allclose(s0, s1)
    # the gate value of the forced expert is its unbiased sigmoid affinity
    pos = (i1 == 5).float().argmax(1)
    assert torch.allclose(w1.gather(1, pos[:, None]).squeeze(1), torch.sigmoid(x @ gate.weight[5]), atol=1e-6)


def test_group_limited_routing_stays_within_top_groups():
    config = tiny(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)
    gate = Transformer(config).moe_layers()[0].gate
    _, idx, _ = gate(torch.randn(200, 128))
    groups = idx // 2
    assert all(len(set(g.tolist())) <= 2 for g in groups)


def test_aux_loss_free_bias_update_direction():
    model = Transformer(tiny())
    counts = [torch.tensor([10, 0, 5, 5, 5, 5, 5, 5])] * len(model.moe_layers())
    model.update_routing_bias(counts, gamma=0.01)
    bias = model.moe_layers()[0].gate.e_score_correction_bias
    assert bias[0] < 0 < bias[1] and bias[2] == 0


def test_sequence_balance_loss_is_one_when_uniform():
    model = Transformer(tiny()).train()
    moe = model.moe_layers()[0]
    e, t = 8, 8
    scores = torch.full((1, t, e), 0.5)
    indices = torch.stack([torch.tensor([2 * (i % 4), 2 * (i % 4) + 1]) for i in range(t)])[None]
    assert math.isclose(moe.sequence_balance_loss(scores, indices).item(), 1.0, rel_tol=1e-6)
    model(torch.randint(0, 512, (2, 8)))
    assert model.balance_loss().item() > 0


def test_moe_layers_include_the_mtp_modules():
    model = Transformer(tiny(num_nextn_predict_layers=2))  # layer 0 is dense (first_k_dense_replace=1)
    assert [name for name, _ in model.named_moe_layers()] == ["layer 1", "layer 2", "layer 3", "MTP 1", "MTP 2"]
    assert model.moe_layers()[3] is model.mtp[0].mlp and model.moe_layers()[4] is model.mtp[1].mlp


def test_counts_and_balance_loss_are_those_of_the_last_forward_the_mtp_module_included():
    model = random_model(tiny(), seed=0).train()
    x = torch.randint(0, 512, (2, 9))
    inputs = record_moe_inputs(model)
    hidden = model.hidden_states(x)
    model.mtp_logits(hidden, x)
    counts = model.expert_counts()
    k = model.config.num_experts_per_tok
    assert [int(c.sum()) for c in counts] == [2 * 9 * k] * 3 + [2 * 8 * k]  # MTP 1 sees positions 0..7
    expected = {name: balance_by_hand(moe, inputs[name]) for name, moe in model.named_moe_layers()}
    assert model.balance_loss().item() == pytest.approx(sum(expected.values()), rel=1e-5)
    assert expected["MTP 1"] > 0.5  # a real share of the total: ~1 per layer

    # A forward without MTP: its module's counts and loss from the forward above are gone.
    model.hidden_states(x)
    assert model.expert_counts()[3].sum() == 0
    main = sum(v for name, v in expected.items() if name != "MTP 1")
    assert model.balance_loss().item() == pytest.approx(main, rel=1e-5)
    # ... and the bias update leaves the layer that did not run as it was.
    before = [m.gate.e_score_correction_bias.clone() for m in model.moe_layers()]
    model.update_routing_bias(model.expert_counts(), gamma=0.01)
    after = [m.gate.e_score_correction_bias for m in model.moe_layers()]
    assert [not torch.equal(a, b) for a, b in zip(after, before)] == [True, True, True, False]
    with pytest.raises(ValueError, match="update_routing_bias: 3 count tensors for 4 MoE layers"):
        model.update_routing_bias(model.expert_counts()[:3], gamma=0.01)
    # In eval mode no balance loss is computed, and none of training remains.
    model.eval()
    with torch.no_grad():
        model(x)
    assert model.balance_loss().item() == 0


def test_mla_refuses_a_mask_with_a_cache():
    config = tiny()
    model = random_model(config)
    cache = LatentCache.empty(config, batch=1, max_len=8)
    x = torch.randint(0, 512, (1, 4))
    with pytest.raises(ValueError, match=r"^MLA: a mask cannot be combined with a cache"):
        model.hidden_states(x, positions=torch.arange(4)[None], cache=cache, mask=document_mask(x, 0))


def test_mtp_logits_and_parameter_names():
    model = random_model(tiny(), norms=False)
    x = torch.randint(0, 512, (2, 10))
    hidden = model.hidden_states(x)
    (depth1,) = model.mtp_logits(hidden, x)
    assert depth1.shape == (2, 9, 512)
    names = [n for n, _ in model.named_parameters() if n.startswith("mtp.")]
    assert any(n.startswith("mtp.0.eh_proj") for n in names) and any("mtp.0.mlp.experts" in n for n in names)
    # the MTP prediction at position i depends on token i+1
    x2 = x.clone()
    x2[:, 5] = (x2[:, 5] + 1) % 512
    (other,) = model.mtp_logits(model.hidden_states(x2), x2)
    assert not torch.allclose(depth1[:, 4], other[:, 4]) and torch.allclose(depth1[:, :3], other[:, :3], atol=1e-6)


def test_document_mask_makes_packed_documents_independent():
    torch.manual_seed(0)
    model = random_model(tiny(), norms=False)
    docs = [torch.randint(3, 512, (1, n)) for n in (7, 12, 5)]
    for d in docs:
        d[0, 0] = 0  # each document starts at BOS
    packed = torch.cat(docs, dim=1)
    mask = document_mask(packed, 0)
    assert mask.shape == (1, 24, 24) and mask[0, 8, 6].item() is False and mask[0, 8, 7].item() is True
    with torch.no_grad():
        hidden = model.hidden_states(packed, mask=mask)
        alone = torch.cat([model.hidden_states(d) for d in docs], dim=1)  # RoPE is relative: same scores
        assert torch.allclose(hidden, alone, atol=1e-5)
        assert not torch.allclose(model.hidden_states(packed)[:, 7:], alone[:, 7:], atol=1e-2)  # unmasked leaks
        (mtp,) = model.mtp_logits(hidden, packed, mask)
        (mtp_alone,) = model.mtp_logits(model.hidden_states(docs[0]), docs[0])
        assert torch.allclose(mtp[:, :6], mtp_alone, atol=1e-5)


def test_model_trains():
    torch.manual_seed(0)
    model = Transformer(tiny()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 512, (4, 16))
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_yarn_frequencies():
    config = tiny(rope_scaling=YARN)
    plain, m0 = rope_frequencies(tiny())
    scaled, m1 = rope_frequencies(config)
    assert m0 == 1.0 and m1 == 1.0  # mscale == mscale_all_dim
    assert torch.isclose(scaled[0], plain[0]) and torch.isclose(scaled[-1], plain[-1] / 4)
    assert config.softmax_scale == pytest.approx(32**-0.5 * (0.1 * math.log(4) + 1) ** 2)


def test_full_size_parameter_counts():
    v3 = count_parameters(ModelConfig.preset("v3"))
    assert v3["total"] == pytest.approx(671e9, rel=0.01)
    assert v3["total_with_mtp"] == pytest.approx(685e9, rel=0.01)
    assert v3["active"] == pytest.approx(37e9, rel=0.011)
    lite = count_parameters(ModelConfig.preset("v2-lite"))
    assert lite["total"] == pytest.approx(15.7e9, rel=0.01)
    assert lite["active"] == pytest.approx(2.4e9, rel=0.03)
    kv = kv_cache_bytes_per_token(ModelConfig.preset("v3"), bytes_per_value=1)
    assert kv["mla"] == 61 * 576 and kv["mha"] == 61 * 32768


def test_bad_config_values_are_named():
    with pytest.raises(NanoseekError, match="topk_method 'best'"):
        tiny(topk_method="best")
    with pytest.raises(NanoseekError, match="n_group"):
        tiny(n_group=3)
    with pytest.raises(NanoseekError, match="unknown preset 'huge'"):
        ModelConfig.preset("huge")
