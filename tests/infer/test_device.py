"""Any device, any dtype: the engine in bfloat16 on the CPU decodes what the bfloat16 model's own
forward decodes, the device/dtype settings fail as one line, and (marked `cuda`, skipped without a
GPU) the same engine on CUDA: tokens equal to the CPU's, sampling, MTP, the SDPA kernels."""

import json

import pytest
import torch
import torch.nn.functional as F

from infer_support import CONFIG, greedy_reference, make_model, prompts
from nanoseek import ModelConfig, NanoseekError, Transformer, save_pretrained
from nanoseek.device import place_model, resolve_device, resolve_dtype
from nanoseek.infer import Engine, SamplingParams

from model_support import random_model

GREEDY = SamplingParams(temperature=0, max_tokens=12)
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when torch sees no GPU")


def bf16_model(seed: int = 2) -> Transformer:
    # With seed 2, one of the five prompts below decodes differently in bfloat16 than in float32
    # (a near tie), so a test that ran in float32 by mistake fails.
    return place_model(make_model(seed), dtype=torch.bfloat16)


# ---- placing a model -------------------------------------------------------------------
def test_place_model_casts_the_weights_and_keeps_the_float32_buffers():
    model = make_model(tie_word_embeddings=True)
    bias = model.moe_layers()[0].gate.e_score_correction_bias.clone()
    place_model(model, torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.embed_tokens.weight  # still tied
    gate = model.moe_layers()[0].gate
    assert gate.e_score_correction_bias.dtype == torch.float32 and torch.equal(gate.e_score_correction_bias, bias)
    assert model.rope.inv_freq.dtype == torch.float32


def test_engine_dtype_and_device_follow_the_model_or_the_arguments():
    model = make_model()
    engine = Engine(model, max_batch_size=2, max_seq_len=32)
    assert (engine.dtype, engine.device.type, engine.latents.dtype) == (torch.float32, "cpu", torch.float32)
    engine = Engine(model, max_batch_size=2, max_seq_len=32, device="cpu", dtype="bfloat16")
    assert engine.latents.dtype == torch.bfloat16 and model.embed_tokens.weight.dtype == torch.bfloat16
    assert engine.kv_cache_bytes_per_token() == CONFIG["num_hidden_layers"] * (24 + 8) * 2


def test_device_and_dtype_errors_are_one_line():
    with pytest.raises(
        NanoseekError,
        match=r"^--dtype: float16 runs on a GPU only; on the CPU use bfloat16 or "
        r"float32$",
    ):
        resolve_dtype("float16", torch.device("cpu"))
    with pytest.raises(NanoseekError, match=r"^--dtype: 'float64' is not one of float32, bfloat16, float16$"):
        resolve_dtype("float64", torch.device("cpu"))
    with pytest.raises(NanoseekError, match=r"^--device: 'tpu' is not one of auto, cpu, cuda \(or cuda:N\)$"):
        resolve_device("tpu")
    with pytest.raises(NanoseekError, match="Engine dtype: float16 runs on a GPU only"):
        Engine(make_model(), max_batch_size=1, max_seq_len=16, device="cpu", dtype="float16")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@no_gpu
def test_cuda_without_a_gpu_is_one_line():
    with pytest.raises(NanoseekError, match=r"^--device: cuda was asked for, but torch sees no GPU$"):
        resolve_device("cuda")
    with pytest.raises(NanoseekError, match=r"^Engine device: cuda was asked for"):
        Engine(make_model(), max_batch_size=1, max_seq_len=16, device="cuda")


# ---- bfloat16 on the CPU -----------------------------------------------------------------
@pytest.mark.parametrize("folded", [True, False])
def test_bf16_greedy_equals_the_bf16_model_forward(folded):
    model = bf16_model()
    ps = prompts([5, 17, 2, 30, 9])
    engine = Engine(model, max_batch_size=3, max_seq_len=64, folded=folded)
    assert engine.latents.dtype == torch.bfloat16
    for p, out in zip(ps, engine.generate(ps, GREEDY)):
        assert out.outputs[0].token_ids == greedy_reference(model, p, GREEDY.max_tokens)


def test_bf16_speculative_greedy_equals_plain_greedy():
    model = bf16_model()
    ps = prompts([4, 21, 11])
    params = SamplingParams(temperature=0, max_tokens=12, min_tokens=12)
    plain = Engine(model, max_batch_size=3, max_seq_len=64).generate(ps, params)
    engine = Engine(model, max_batch_size=3, max_seq_len=64, speculative=True)
    assert [o.outputs[0].token_ids for o in engine.generate(ps, params)] == [o.outputs[0].token_ids for o in plain]
    assert engine.drafter.latents.dtype == torch.bfloat16 and engine.speculative_stats.drafted > 0


def test_bf16_sampling_params_work():
    model = bf16_model()
    ps = prompts([6, 13])
    engine = Engine(model, max_batch_size=8, max_seq_len=64)
    greedy = [o.outputs[0].token_ids for o in engine.generate(ps, GREEDY)]
    seeded = SamplingParams(temperature=1.5, max_tokens=12, seed=5, n=3)
    first, again = engine.generate(ps, seeded), engine.generate(ps, seeded)
    assert [[c.token_ids for c in o.outputs] for o in first] == [[c.token_ids for c in o.outputs] for o in again]
    assert len({tuple(c.token_ids) for o in first for c in o.outputs}) > 2
    # top-k 1 and a tiny nucleus keep only the likeliest token: sampling them is greedy decoding.
    for params in (
        SamplingParams(temperature=1.0, top_k=1, max_tokens=12, seed=1),
        SamplingParams(temperature=0.7, top_p=1e-4, max_tokens=12, seed=2),
    ):
        assert [o.outputs[0].token_ids for o in engine.generate(ps, params)] == greedy


def test_bf16_folded_runner_is_as_close_to_float32_as_the_bf16_model():
    """The folded decode step in bfloat16 against the float32 model: its error is that of the
    bfloat16 model's own forward, not more (the folding is exact up to rounding)."""
    ref = make_model(seed=5)
    model = place_model(make_model(seed=5), dtype=torch.bfloat16)
    engine = Engine(model, max_batch_size=3, max_seq_len=64)
    ids = torch.tensor(prompts([12, 12, 12], seed=9))
    lengths = [6, 10, 3]
    rows = torch.tensor([2, 0, 1])
    with torch.inference_mode():
        for i, n in enumerate(lengths):
            model.hidden_states(
                ids[i : i + 1, :n], cache=engine.cache, rows=rows[i : i + 1], positions=torch.arange(n)[None]
            )
        nxt = torch.stack([ids[i, n : n + 2] for i, n in enumerate(lengths)])
        positions = torch.tensor([[n, n + 1] for n in lengths])
        ours = engine.runner.hidden_states(
            nxt, engine.runner.context(positions, rows, rows.tolist(), lengths), engine.latents
        )
        assert ours.dtype == torch.bfloat16
        for i, n in enumerate(lengths):
            want = ref.hidden_states(ids[i : i + 1, : n + 2])[0, n:]
            own = model.hidden_states(ids[i : i + 1, : n + 2])[0, n:].float()
            bf16_error = (own - want).abs().max()
            assert 1e-3 < bf16_error < 0.2  # bfloat16 rounding shows, and stays small
            assert (ours[i].float() - want).abs().max() < 2 * bf16_error


# ---- the commands' --device / --dtype ----------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("device")
    save_pretrained(make_model(seed=2), directory)
    return directory


def test_cli_generate_in_bf16_and_its_errors(checkpoint, capsys):
    from nanoseek.cli import main

    ps = prompts([5, 9])
    args = ["generate", "--model", str(checkpoint), "--max-tokens", "8", "--json"]
    for p in ps:
        args += ["--prompt-ids", ",".join(map(str, p))]
    assert main(args + ["--device", "cpu", "--dtype", "bfloat16"]) == 0
    got = [json.loads(line)["outputs"][0]["token_ids"] for line in capsys.readouterr().out.splitlines()]
    model = bf16_model()
    assert got == [greedy_reference(model, p, 8) for p in ps]
    for command in (["generate", "--prompt-ids", "5,6"], ["chat"], ["serve", "--port", "0"]):
        assert main([*command, "--model", str(checkpoint), "--device", "cpu", "--dtype", "float16"]) == 2
        err = capsys.readouterr().err
        assert err == "error: --dtype: float16 runs on a GPU only; on the CPU use bfloat16 or float32\n", command


@no_gpu
def test_cli_cuda_without_a_gpu_is_one_line(checkpoint, capsys):
    from nanoseek.cli import main

    model = ["--model", str(checkpoint)]
    for command in (
        ["generate", "--prompt-ids", "5,6", *model],
        ["chat", *model],
        ["serve", "--port", "0", *model],
        ["bench", "decode"],
        ["bench", "train"],
    ):
        assert main([*command, "--device", "cuda"]) == 2
        assert capsys.readouterr().err == "error: --device: cuda was asked for, but torch sees no GPU\n", command


def test_from_pretrained_loads_in_the_dtype_asked_for(checkpoint):
    engine = Engine.from_pretrained(checkpoint, device="cpu", dtype="bfloat16", max_batch_size=2, max_seq_len=32)
    assert engine.model.embed_tokens.weight.dtype == torch.bfloat16 and engine.latents.dtype == torch.bfloat16
    gate = engine.model.moe_layers()[0].gate
    assert gate.e_score_correction_bias.dtype == torch.float32
    assert Engine.from_pretrained(checkpoint, max_batch_size=1, max_seq_len=16).device.type == "cpu"


# ---- CUDA (skipped without a GPU; scripts/gpu_check.sh runs these) -------------------------
CUDA = torch.device("cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("speculative", [False, True])
@pytest.mark.parametrize("folded", [True, False])
def test_cuda_greedy_equals_the_cpu_tokens(folded, speculative):
    ps = prompts([5, 17, 2, 30, 9])
    cpu = Engine(make_model(), max_batch_size=3, max_seq_len=64).generate(ps, GREEDY)
    engine = Engine(
        make_model(), max_batch_size=3, max_seq_len=64, folded=folded, speculative=speculative, device="cuda"
    )
    assert engine.latents.device.type == "cuda" and next(engine.model.parameters()).is_cuda
    assert [o.outputs[0].token_ids for o in engine.generate(ps, GREEDY)] == [o.outputs[0].token_ids for o in cpu]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_half_greedy_equals_the_models_own_forward(dtype):
    model = place_model(make_model(seed=0), CUDA, getattr(torch, dtype))
    ps = prompts([5, 17, 2, 30, 9])
    engine = Engine(model, max_batch_size=3, max_seq_len=64)

    @torch.no_grad()
    def reference(p, n):
        ids = list(p)
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids], device=CUDA))[0, -1].argmax()))
        return ids[len(p) :]

    for p, out in zip(ps, engine.generate(ps, GREEDY)):
        assert out.outputs[0].token_ids == reference(p, GREEDY.max_tokens)


@pytest.mark.cuda
def test_cuda_sampling_draws_what_the_cpu_draws():
    """The generators stay on the CPU: the same seed gives the same tokens on CUDA (float32)."""
    ps = prompts([6, 13])
    cases = [
        SamplingParams(temperature=1.3, max_tokens=12, seed=5, n=3),
        SamplingParams(temperature=0.9, top_k=5, top_p=0.8, min_tokens=4, max_tokens=12, seed=9, n=2),
        [SamplingParams(temperature=0, max_tokens=12), SamplingParams(temperature=1.0, max_tokens=12, seed=3)],
    ]
    cpu, gpu = (
        Engine(make_model(), max_batch_size=8, max_seq_len=64),
        Engine(make_model(), max_batch_size=8, max_seq_len=64, device="cuda"),
    )
    for params in cases:
        a, b = cpu.generate(ps, params), gpu.generate(ps, params)
        assert [[c.token_ids for c in o.outputs] for o in a] == [[c.token_ids for c in o.outputs] for o in b]


@pytest.mark.cuda
def test_cuda_from_pretrained(checkpoint):
    engine = Engine.from_pretrained(checkpoint, device="cuda", dtype="bfloat16", max_batch_size=2, max_seq_len=32)
    assert engine.latents.is_cuda and engine.latents.dtype == torch.bfloat16
    out = engine.generate(prompts([5]), SamplingParams(temperature=1.0, max_tokens=6, seed=0))
    assert len(out[0].outputs[0].token_ids) == 6


# The head dims of the shipped presets and of DeepSeek-V3 itself (q/k 128 + 64, v 128).
ATTENTION_SHAPES = {
    "tiny": ModelConfig.preset("tiny").replace(vocab_size=320),
    "small": ModelConfig.preset("small").replace(vocab_size=320),
    "v3-heads": ModelConfig(
        **{
            **CONFIG,
            "hidden_size": 256,
            "num_attention_heads": 2,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64,
            "v_head_dim": 128,
            "kv_lora_rank": 64,
        }
    ),
}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(ATTENTION_SHAPES))
def test_cuda_attention_takes_the_fused_sdpa_kernels(name, dtype):
    """Training's attention (causal, with a document mask, and GRPO's over a latent cache) runs
    with only the flash and memory-efficient SDPA kernels allowed: the shapes and dtypes MLA
    passes fit one of them (no V padding on CUDA, no fallback to the math kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from nanoseek.model import LatentCache, document_mask

    config = ATTENTION_SHAPES[name]
    reference = place_model(random_model(config), CUDA).eval()
    model = place_model(random_model(config), CUDA, getattr(torch, dtype)).train()
    ids = torch.randint(3, 320, (2, 48), device=CUDA)
    ids[:, [0, 20]] = 1
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        for mask in (None, document_mask(ids, 1)):
            hidden = model.hidden_states(ids, mask=mask)
            loss = F.cross_entropy(model.lm_head(hidden).float().flatten(0, 1), ids.flatten())
            loss.backward()
            assert torch.isfinite(loss)
        cache = LatentCache.empty(config, 2, 64, dtype=getattr(torch, dtype), device=CUDA)
        positions = torch.arange(48, device=CUDA).expand(2, 48)
        model.hidden_states(ids, positions, cache, impl="naive").float().sum().backward()
    with torch.no_grad():  # and the fused kernels are as close to float32's math kernel as the math kernel is
        with sdpa_kernel([SDPBackend.MATH]):
            want = reference.hidden_states(ids)
            math = model.hidden_states(ids).float()
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            fused = model.hidden_states(ids).float()
    if dtype == "float32":
        assert (fused - want).abs().max() < 1e-4
    else:
        assert (fused - want).abs().max() < 2 * (math - want).abs().max() + 1e-2
