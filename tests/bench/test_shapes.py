"""`--experts E --active K`: the preset's widths at DeepSeek's expert counts."""

import argparse

import pytest

from nanoseek import NanoseekError
from nanoseek.bench import shapes
from nanoseek.config import ModelConfig
from nanoseek.model import Transformer


def parse(*argv):
    p = argparse.ArgumentParser()
    shapes.add_arguments(p)
    return p.parse_args(argv)


@pytest.mark.parametrize(
    "argv, shape, experts, active, groups, kept",
    [
        ((), "small", 8, 2, 2, 1),
        (("--experts", "16", "--active", "4"), "small:16/4", 16, 4, 2, 1),
        (("--experts", "64", "--active", "6"), "small:64/6", 64, 6, 8, 4),
        (("--experts", "256", "--active", "8"), "small:256/8", 256, 8, 8, 4),  # V3's routing
        (("--experts", "6", "--active", "5"), "small:6/5", 6, 5, 2, 2),  # two groups of 3 hold 5 only together
        (("--experts", "7", "--active", "3"), "small:7/3", 7, 3, 1, 1),
        (("--preset", "tiny", "--active", "4"), "tiny:8/4", 8, 4, 2, 1),
    ],
)
def test_a_shape_is_the_preset_with_its_experts_replaced(argv, shape, experts, active, groups, kept):
    assert shapes.spec(parse(*argv)) == shape
    config = shapes.model_config(shape)
    base = ModelConfig.preset(shape.partition(":")[0])
    assert (config.n_routed_experts, config.num_experts_per_tok) == (experts, active)
    assert (config.n_group, config.topk_group) == (groups, kept)
    assert (config.hidden_size, config.moe_intermediate_size, config.num_hidden_layers) == (
        base.hidden_size,
        base.moe_intermediate_size,
        base.num_hidden_layers,
    )


def test_the_model_of_a_shape_routes_k_of_e():
    import torch

    config = shapes.model_config("tiny:16/4")
    model = Transformer(config).eval()
    with torch.no_grad():
        model(torch.randint(0, config.vocab_size, (2, 8)))
    gate = next(m for _, m in model.named_moe_layers()).gate
    assert gate.weight.shape[0] == 16
    counts = [m.expert_counts for _, m in model.named_moe_layers() if m.expert_counts is not None]
    assert counts and all(c.numel() == 16 and int(c.sum()) == 2 * 8 * 4 for c in counts)


@pytest.mark.parametrize(
    "shape, message",
    [
        ("small:8/9", "--experts 8 --active 9: need 1 <= active <= experts"),
        ("small:8/0", "--experts 8 --active 0: need 1 <= active <= experts"),
        ("small:8", "model shape 'small:8': expected PRESET:EXPERTS/ACTIVE"),
        ("huge", "unknown preset 'huge'"),
    ],
)
def test_a_shape_that_cannot_be_is_one_line(shape, message):
    with pytest.raises(NanoseekError, match=message.replace("(", r"\(").replace(")", r"\)")):
        shapes.model_config(shape)
