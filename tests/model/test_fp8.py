"""FP8 tiles and blocks (V3 section 3.3): error bounds, the FP8 linear against float32,
FP8 checkpoints, serving with FP8 weights through the engine, and a short FP8 training run
against the same run in float32."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import nanoseek.cli
from nanoseek import ModelConfig, Transformer, load_pretrained, save_pretrained
from nanoseek.fp8 import (
    E4M3,
    FP8Linear,
    FP8WeightLinear,
    dequantize_blockwise,
    dequantize_tiles,
    fp8_swap,
    quantize_blockwise,
    quantize_tiles,
    scaled_mm_support,
    to_fp8_weights,
    weight_bytes,
)
from nanoseek.infer import Engine, SamplingParams

from model_support import random_model

# E4M3 keeps 3 mantissa bits: rounding to nearest costs at most 2^-4 of a value in the
# normal range (|q| >= 2^-6), and at most half the subnormal step, 2^-10, below it.
NORMAL_REL, SUBNORMAL_ABS = 2**-4, 2**-10


def cli(argv: list[str]) -> int:
    """`nanoseek ARGV`."""
    return nanoseek.cli.main(argv)


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def within_e4m3_bound(x, deq, scale_full):
    bound = torch.maximum(x.abs() * NORMAL_REL, scale_full * SUBNORMAL_ABS)
    return ((deq - x).abs() <= bound * (1 + 1e-6)).all().item()


# ---- quantise / dequantise ----------------------------------------------------------
def test_tile_quantisation_error_bound():
    torch.manual_seed(0)
    x = torch.randn(5, 7, 300) * torch.logspace(-3, 2, 300)  # channels of very different scale, a partial tile
    q, s = quantize_tiles(x)
    assert q.dtype == E4M3 and q.shape == x.shape and s.shape == (5, 7, 3)
    deq = dequantize_tiles(q, s)
    assert within_e4m3_bound(x, deq, s.repeat_interleave(128, -1)[..., :300])
    # each tile's max-abs maps to E4M3's largest value, 448
    amax = F.pad(x.abs(), (0, 84)).view(5, 7, 3, 128).amax(-1)
    assert torch.allclose(s * 448, amax, rtol=1e-6)


def test_block_quantisation_error_bound():
    torch.manual_seed(1)
    w = torch.randn(300, 200) * torch.logspace(-2, 1, 200)
    q, s = quantize_blockwise(w)
    assert q.dtype == E4M3 and s.shape == (3, 2)
    deq = dequantize_blockwise(q, s)
    full = s.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    assert within_e4m3_bound(w, deq, full)
    # a 128x128 block of W is the same block of W^T
    assert torch.equal(dequantize_blockwise(q.t(), s.t()), deq.t())


def test_all_zero_tiles_and_blocks_give_exact_zeros():
    x = torch.randn(4, 384)
    x[1, 128:256] = 0
    x[3] = 0
    q, s = quantize_tiles(x)
    deq = dequantize_tiles(q, s)
    assert torch.isfinite(s).all() and not torch.isnan(deq).any()
    assert (deq[1, 128:256] == 0).all() and (deq[3] == 0).all()
    w = torch.randn(256, 256)
    w[:128, 128:] = 0
    qw, sw = quantize_blockwise(w)
    dw = dequantize_blockwise(qw, sw)
    assert torch.isfinite(sw).all() and (dw[:128, 128:] == 0).all() and not torch.isnan(dw).any()
    assert torch.equal(dequantize_blockwise(*quantize_blockwise(torch.zeros(64, 64))), torch.zeros(64, 64))


def test_an_outlier_costs_precision_only_in_its_own_tile():
    torch.manual_seed(2)
    x = torch.randn(8, 512)
    y = x.clone()
    y[3, 200] = 1e5  # tile (3, 1)
    dx, dy = dequantize_tiles(*quantize_tiles(x)), dequantize_tiles(*quantize_tiles(y))
    outside = torch.ones_like(x, dtype=torch.bool)
    outside[3, 128:256] = False
    assert torch.equal(dx[outside], dy[outside])
    # inside its tile the ordinary values fall to E4M3's subnormal steps: much coarser
    inside = torch.zeros_like(outside)
    inside[3, 128:256] = True
    inside[3, 200] = False
    err_with, err_without = (dy - x).abs()[inside].mean(), (dx - x).abs()[inside].mean()
    assert err_with > 5 * err_without

    w = torch.randn(384, 256)
    v = w.clone()
    v[300, 10] = 1e4  # block (2, 0)
    dw, dv = dequantize_blockwise(*quantize_blockwise(w)), dequantize_blockwise(*quantize_blockwise(v))
    outside = torch.ones_like(w, dtype=torch.bool)
    outside[256:, :128] = False
    assert torch.equal(dw[outside], dv[outside])


# ---- FP8Linear -----------------------------------------------------------------------
def linear_pair(in_f=300, out_f=200, bias=True, seed=0):
    torch.manual_seed(seed)
    ref = torch.nn.Linear(in_f, out_f, bias=bias)
    fp8 = FP8Linear(in_f, out_f, bias=bias)
    fp8.load_state_dict(ref.state_dict())
    return ref, fp8


def test_fp8_linear_output_and_gradients_against_float32():
    ref, fp8 = linear_pair()
    x = torch.randn(3, 50, 300) * torch.logspace(-1, 1, 300)
    g = torch.randn(3, 50, 200)
    x_ref, x_fp8 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(x_ref).backward(g)
    y = fp8(x_fp8)
    y.backward(g)
    # Measured: output 3.6%, input gradient 3.6%, weight gradient 4.3% (relative L2).
    assert rel(y, ref(x)) < 0.05
    assert rel(x_fp8.grad, x_ref.grad) < 0.05
    assert rel(fp8.weight.grad, ref.weight.grad) < 0.06
    assert torch.allclose(fp8.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)
    assert fp8.weight.dtype == torch.float32 and fp8.weight.grad.dtype == torch.float32
    # an expert that no token chose runs on an empty slice
    empty = torch.zeros(0, 300, requires_grad=True)
    fp8(empty).sum().backward()
    assert empty.grad.shape == (0, 300)


def test_fp8_linear_is_the_tiled_matmul_it_documents():
    """The emulation: quantise, dequantise exactly, multiply in float32, with the tilings of
    the docstring (x and dy per 1x128 tile, W per 128x128 block, wgrad along tokens)."""
    _, fp8 = linear_pair(bias=False, seed=1)
    x = torch.randn(70, 300, requires_grad=True)
    g = torch.randn(70, 200)
    y = fp8(x)
    y.backward(g)
    xq = dequantize_tiles(*quantize_tiles(x.detach()))
    wq = dequantize_blockwise(*quantize_blockwise(fp8.weight.detach()))
    gq = dequantize_tiles(*quantize_tiles(g))
    assert torch.allclose(y, xq @ wq.t(), rtol=1e-6, atol=1e-6)
    assert torch.allclose(x.grad, gq @ wq, rtol=1e-6, atol=1e-6)
    gt = dequantize_tiles(*quantize_tiles(g.t()))
    xt = dequantize_tiles(*quantize_tiles(xq.t()))
    assert torch.allclose(fp8.weight.grad, gt @ xt.t(), rtol=1e-6, atol=1e-5)


def test_fp8_swap_keeps_parameter_names_and_objects():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny"))
    names_before = list(model.state_dict())
    params_before = {n: p for n, p in model.named_parameters()}
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        ref = model(ids)
    swapped = fp8_swap(model)
    # per block: 5 attention projections; dense MLP 3; MoE 3 x (8 routed + 1 shared); 4 layers + MTP
    assert len(swapped) == 5 * 5 + 3 + 4 * 27
    assert list(model.state_dict()) == names_before
    assert all(params_before[n] is p for n, p in model.named_parameters())
    assert type(model.lm_head) is torch.nn.Linear and type(model.mtp[0].eh_proj) is torch.nn.Linear
    assert isinstance(model.layers[1].mlp.experts[3].down_proj, FP8Linear)
    assert isinstance(model.layers[0].self_attn.kv_b_proj, FP8Linear)
    with torch.no_grad():
        assert rel(model(ids), ref) < 0.1  # measured 7.7%: 4 layers + MTP, each linear ~3.6%


# ---- FP8 checkpoints -------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny-preset model with widths past 128 (partial blocks), saved in float32 and
    converted to fp8 and to bf16 with the CLI."""
    root = tmp_path_factory.mktemp("fp8ckpt")
    config = ModelConfig.preset("tiny").replace(hidden_size=192, moe_intermediate_size=160, intermediate_size=320)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    save_pretrained(model, root / "fp32")
    assert cli(["convert", "--to", "fp8", str(root / "fp32"), str(root / "fp8")]) == 0
    assert cli(["convert", "--to", "bf16", str(root / "fp8"), str(root / "bf16")]) == 0
    assert cli(["convert", "--to", "bf16", str(root / "fp32"), str(root / "bf16-direct")]) == 0
    return root, model


def test_converted_fp8_checkpoint_has_the_released_layout(checkpoints):
    root, model = checkpoints
    config = json.loads((root / "fp8" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    with safe_open(str(root / "fp8" / "model.safetensors"), "pt") as sf:
        w = sf.get_tensor("model.layers.1.mlp.experts.2.up_proj.weight")  # [160, 192]
        s = sf.get_tensor("model.layers.1.mlp.experts.2.up_proj.weight_scale_inv")
        assert w.dtype == E4M3 and s.dtype == torch.float32 and s.shape == (2, 2)
        assert sf.get_tensor("model.layers.0.self_attn.kv_a_proj_with_mqa.weight").dtype == E4M3
        for key in (
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.layers.1.mlp.gate.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.4.eh_proj.weight",
        ):
            assert sf.get_tensor(key).dtype == torch.bfloat16, key
        assert sf.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
    with safe_open(str(root / "bf16" / "model.safetensors"), "pt") as sf:
        assert all(not k.endswith("scale_inv") for k in sf.keys())
        assert sf.get_tensor("model.layers.1.mlp.experts.2.up_proj.weight").dtype == torch.bfloat16
    assert "quantization_config" not in json.loads((root / "bf16" / "config.json").read_text())


def test_fp8_checkpoint_stays_fp8_in_memory_with_logits_close_to_bf16(checkpoints):
    root, model = checkpoints
    fp8 = load_pretrained(root / "fp8", dtype=torch.bfloat16, keep_fp8=True)
    bf16 = load_pretrained(root / "bf16-direct", dtype=torch.bfloat16)
    expert = fp8.layers[1].mlp.experts[2].up_proj
    assert isinstance(expert, FP8WeightLinear) and expert.weight.dtype == E4M3
    assert type(fp8.layers[0].self_attn.kv_b_proj) is torch.nn.Linear  # the absorbed path reads it dense
    dequantised = load_pretrained(root / "fp8")  # the default path still dequantises on load
    assert type(dequantised.layers[1].mlp.experts[2].up_proj) is torch.nn.Linear
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
        got = fp8(ids).float()
        # Same weights, bf16 activations: close everywhere but where a rounding flips a token's
        # top-k expert choice (1 token of 40 for some seeds), which moves that token's logits.
        per_token = (got - dequantised(ids)).abs().amax(-1)
        assert (per_token < 0.05).float().mean() >= 0.9 and rel(got, dequantised(ids)) < 0.06, per_token
        # Measured on this random-init MoE model (routing flips amplify any rounding): logits
        # 11.4% from float32 with FP8 weights, 5.1% with bf16 weights (dense layers only: 6.2%, 0.9%).
        assert rel(got, ref) < 0.15 and rel(bf16(ids).float(), ref) < 0.08
        assert rel(got, bf16(ids).float()) < 0.15
    # memory: FP8 linears take 1 byte per weight plus a float32 per 128x128 block
    names = [n for n, m in fp8.named_modules() if isinstance(m, FP8WeightLinear)]
    fp8_bytes = sum(weight_bytes(fp8.get_submodule(n)) for n in names)
    bf16_bytes = sum(bf16.get_submodule(n).weight.numel() * 2 for n in names)
    assert 0.5 <= fp8_bytes / bf16_bytes < 0.51
    assert weight_bytes(fp8) < 0.75 * weight_bytes(bf16)
    # a model holding FP8 weights saves them as they are
    save_pretrained(fp8, root / "resaved")
    with (
        safe_open(str(root / "resaved" / "model.safetensors"), "pt") as a,
        safe_open(str(root / "fp8" / "model.safetensors"), "pt") as b,
    ):
        key = "model.layers.1.mlp.experts.2.up_proj.weight"
        assert torch.equal(a.get_tensor(key).view(torch.uint8), b.get_tensor(key).view(torch.uint8))


def test_fp8_to_bf16_round_trip_is_the_block_dequantisation(checkpoints):
    root, _ = checkpoints
    key = "model.layers.2.self_attn.o_proj.weight"
    with safe_open(str(root / "fp8" / "model.safetensors"), "pt") as sf:
        want = dequantize_blockwise(sf.get_tensor(key), sf.get_tensor(key + "_scale_inv"), dtype=torch.bfloat16)
    with safe_open(str(root / "bf16" / "model.safetensors"), "pt") as sf:
        assert torch.equal(sf.get_tensor(key), want)


def test_fp8_weight_linear_survives_dtype_casts():
    lin = FP8WeightLinear.from_linear(torch.nn.Linear(200, 130))
    q, s = lin.weight.clone(), lin.weight_scale_inv.clone()
    lin.to(torch.bfloat16)
    assert lin.weight.dtype == E4M3 and lin.weight_scale_inv.dtype == torch.float32
    assert torch.equal(lin.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(lin.weight_scale_inv, s)


def test_convert_bad_input_is_one_line(tmp_path, capsys):
    assert cli(["convert", "--to", "fp8", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope: not a directory" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "ckpt").mkdir()
    assert cli(["convert", "--to", "bf16", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 2
    assert "config.json: file not found" in capsys.readouterr().err


# ---- serving with FP8 weights: the engine and `nanoseek bench decode` ------------------
@torch.no_grad()
def greedy_reference(model, prompt, max_tokens):
    """Greedy decoding by recomputing the whole sequence for every token."""
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        if ids[-1] == model.config.eos_token_id:
            break
    return ids[len(prompt) :]


@pytest.mark.parametrize("kw", [{}, {"q_lora_rank": None, "rope_interleave": False, "attention_bias": True}])
def test_engine_greedy_with_fp8_weights_equals_full_recomputation(kw):
    model = random_model(ModelConfig.preset("tiny").replace(**kw), seed=2)
    if model.config.attention_bias:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.Linear) and m.bias is not None:
                    m.bias.normal_(0, 0.1)
    to_fp8_weights(model)
    engine = Engine(model, max_batch_size=3, max_seq_len=64)
    # The runner calls the FP8 modules rather than folding dense copies of their weights.
    assert all(b.attn.fp8 for b in engine.runner.blocks)
    assert engine.runner.blocks[0].mlp.mlp is not None and not engine.runner.blocks[1].mlp.stacked
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 17, 9)]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == greedy_reference(model, prompt, 12)


def test_bench_decode_fp8_section_halves_the_linear_weights():
    from rich.console import Console

    from nanoseek.bench.decode import DecodeBench, fp8_against_bf16, print_fp8

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny")).eval()
    g = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(3, 512, (b, 6), generator=g).tolist() for b in (1, 2)}
    params = SamplingParams(temperature=0, max_tokens=4, min_tokens=4)
    memory, results = fp8_against_bf16(model, prompts, params, repeats=1, log=lambda *_: None)
    assert 0.5 <= memory.linears_ratio < 0.51  # 1 byte a weight and 4 bytes a 128x128 block, against 2
    assert memory.fp8_model < 0.8 * memory.bf16_model
    assert [r.batch for r in results] == [1, 2] and all(r.fp8_tokens_per_s > 0 < r.bf16_tokens_per_s for r in results)
    bench = DecodeBench("tiny", 1, 6, 4, 1, fp8_results=results, fp8_memory=memory)
    console = Console(record=True, width=200)
    print_fp8(bench, console)
    text = console.export_text()
    assert "FP8 vs bf16 weights" in text and f"{memory.fp8_linears:,}" in text and "0.50" in text


# ---- training in FP8 -------------------------------------------------------------------
def bigram_batches(steps, batch, seq, vocab, seed):
    """Random tokens from a fixed random bigram chain (4 successors per token): learnable,
    so the loss falls well below ln(vocab) within a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 4), generator=g)
    ids = torch.empty(steps, batch, seq + 1, dtype=torch.long)
    ids[..., 0] = torch.randint(0, vocab, (steps, batch), generator=g)
    choice = torch.randint(0, 4, (steps, batch, seq), generator=g)
    for t in range(seq):
        ids[..., t + 1] = successors[ids[..., t], choice[..., t]]
    return ids


def train_tiny(fp8: bool, steps: int, batch: int = 8, seq: int = 64, seed: int = 0) -> list[float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trainer tests do: two threads on shared cores can run 10x slower
    try:
        return _train_tiny(fp8, steps, batch, seq, seed)
    finally:
        torch.set_num_threads(threads)


def _train_tiny(fp8, steps, batch, seq, seed):
    torch.manual_seed(seed)
    config = ModelConfig.preset("tiny")
    model = Transformer(config)
    if fp8:
        fp8_swap(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    data = bigram_batches(steps, batch, seq, config.vocab_size, seed + 1)
    losses = []
    for ids in data:
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("steps", [40, pytest.param(100, marks=pytest.mark.slow)])
def test_fp8_training_loss_within_one_percent_of_float32(steps):
    """Measured (mean loss of the last 10 steps, FP8 against float32): 40 steps -0.30%, -0.02%,
    -0.05% for seeds 0, 1, 2; 100 steps -0.14%. V3 reports under 0.25% at scale."""
    fp32, fp8 = train_tiny(False, steps), train_tiny(True, steps)
    final32, final8 = sum(fp32[-10:]) / 10, sum(fp8[-10:]) / 10  # the last 10 steps, the same batches
    assert fp32[0] > 6.0 and final32 < 3.5  # it learned: from ln(512) = 6.24
    assert abs(final8 - final32) / final32 < 0.01


def test_scaled_mm_operands_pass_torchs_layout_checks():
    """Without a GPU, torch's meta kernel still checks the shapes and strides that the
    blockwise scaled_mm wants, for the three GEMMs of FP8Linear and awkward sizes."""
    from nanoseek.fp8 import _scaled_mm_nt

    def meta(*ts):
        return [t.to("meta") for t in ts]

    w_q, w_s = quantize_blockwise(torch.randn(330, 300))
    x_q, x_s = quantize_tiles(torch.randn(200, 300))
    g = torch.randn(200, 330)
    g_q, g_s = quantize_tiles(g)
    gt_q, gt_s = quantize_tiles(g.t())
    xt_q, xt_s = quantize_tiles(torch.randn(300, 200))
    for out_dtype in (torch.float32, torch.bfloat16):
        assert _scaled_mm_nt(*meta(x_q, x_s, w_q, w_s), True, out_dtype).shape == (200, 330)  # fprop
        assert _scaled_mm_nt(*meta(g_q, g_s, w_q.t(), w_s.t()), True, out_dtype).shape == (200, 300)  # dgrad
        assert _scaled_mm_nt(*meta(gt_q, gt_s, xt_q, xt_s), False, out_dtype).shape == (330, 300)  # wgrad


@pytest.mark.cuda  # the FP8 scaled_mm fast path needs a CUDA GPU
def test_gpu_scaled_mm_matches_the_emulation():
    device = torch.device("cuda")
    if scaled_mm_support(device) is None:
        pytest.skip(
            "this GPU / torch build has no blockwise FP8 scaled_mm (1x128 and 128x128 scales need "
            "sm_90 and CUDA 12.9+); the emulated path runs instead"
        )
    ref, fast = linear_pair(in_f=512, out_f=384)
    ref, fast = ref.to(device), fast.to(device)
    emul = FP8Linear(512, 384).to(device)
    emul.load_state_dict(fast.state_dict())
    emul.backend = "emulate"
    fast.backend = "scaled_mm"
    x = torch.randn(2, 200, 512, device=device)
    g = torch.randn(2, 200, 384, device=device)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    y_fast, y_emul = fast(xs[0]), emul(xs[1])
    y_fast.backward(g)
    y_emul.backward(g)
    tol = 1e-2 if scaled_mm_support(device) == torch.bfloat16 else 1e-4  # bf16 output rounding
    assert rel(y_fast, y_emul) < tol
    assert rel(xs[0].grad, xs[1].grad) < tol
    assert rel(fast.weight.grad, emul.weight.grad) < tol
    lin = FP8WeightLinear.from_linear(ref)
    assert rel(lin(x), F.linear(x, dequantize_blockwise(lin.weight, lin.weight_scale_inv), ref.bias)) < 0.05
