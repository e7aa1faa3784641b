"""`nanoseek bench decode` on the dense students: the engine against transformers' generate on the
same random bf16 weights (the `student` preset: the 1.5B one takes minutes per token on this
CPU), the same greedy tokens, and each tool's peak memory, measured."""

import argparse

import pytest
import torch
from safetensors import safe_open

from nanoseek import NanoseekError
from nanoseek.bench import shapes
from nanoseek.bench.decode import PeakMemory, random_dense_checkpoint
from nanoseek.cli import main
from nanoseek.dense import DENSE_PRESETS, DenseConfig

RESIDENT_PEAK = PeakMemory(torch.device("cpu")).start() is not None  # Linux: VmHWM can be reset


def cells_by_first(text: str) -> dict[str, list[str]]:
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0]:
            out[cells[0]] = cells
    return out


def bench(*argv) -> str:
    pytest.importorskip("transformers")
    return main(["bench", "decode", "--prompt-len", "4", "--new-tokens", "3", "--repeats", "1", *argv])


def test_the_student_preset_against_transformers_in_bf16(capsys):
    assert bench("--preset", "student", "--batch-sizes", "1,2") == 0
    out = capsys.readouterr().out
    assert "MTP speculative decoding: skipped" in out and "FP8 weights: skipped" in out
    assert "student, prompt 4 + 3 new tokens, greedy, cpu, bfloat16" in out
    rows = cells_by_first(out)
    for batch in ("1", "2"):  # batch | transformers tok/s | nanoseek tok/s | speed-up | same tokens
        assert len(rows[batch]) == 5 and rows[batch][-1] == "yes", rows[batch]
        assert float(rows[batch][1]) > 0 and float(rows[batch][2]) > 0
    # 4 layers x 2 x 2 KV heads x head_dim 16 x 2 bytes, and transformers' cache measured the same
    assert rows["nanoseek: keys and values per KV head (GQA)"][1] == "512"
    assert rows["transformers: measured from its DynamicCache"][1] == "512"
    assert rows["standard attention: per-head keys and values"][1] == "1,024"
    ours, hf = rows["nanoseek"], rows["transformers"]  # tool | held | load peak | decode peak | peak | vs HF
    assert len(ours) == len(hf) == 6
    if RESIDENT_PEAK:
        held, peak = float(ours[1]), float(ours[4])
        assert 0.5 < held < 8  # 312,384 bf16 weights: 0.6 MiB, with the allocator's pages
        assert held <= float(ours[3]) <= peak
        assert float(hf[4]) > 0 and hf[5] == "1.00x"


def test_a_transformers_qwen2_directory_in_float32(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.Qwen2Config(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    assert bench("--model", str(tmp_path), "--dtype", "float32", "--batch-sizes", "2", "--no-fp8") == 0
    out = capsys.readouterr().out
    assert "FP8 weights: skipped" not in out and "float32" in out
    rows = cells_by_first(out)
    assert rows["2"][-1] == "yes"
    assert rows["nanoseek: keys and values per KV head (GQA)"][1] == f"{3 * 2 * 2 * 16 * 4:,}"  # 768


def test_random_weights_are_drawn_in_the_dtype_and_saved_as_it(tmp_path):
    config = DenseConfig.preset("student")
    directory = random_dense_checkpoint(config, tmp_path, torch.bfloat16, seed=3)
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        norm = f.get_tensor("model.norm.weight")
    assert q.dtype == norm.dtype == torch.bfloat16
    assert abs(q.float().std().item() - config.initializer_range) < 0.002  # N(0, 0.02)
    assert torch.equal(norm, torch.ones_like(norm))


def test_decode_takes_every_dense_preset_and_no_experts_for_them():
    p = argparse.ArgumentParser()
    shapes.add_arguments(p, dense=True)
    for name in DENSE_PRESETS:
        args = p.parse_args(["--preset", name])
        assert shapes.is_dense(shapes.spec(args)) and shapes.dense_config(name) == DenseConfig.preset(name)
    with pytest.raises(NanoseekError, match="--experts/--active: r1-distill-qwen-1.5b is a dense model"):
        shapes.spec(p.parse_args(["--preset", "r1-distill-qwen-1.5b", "--experts", "8"]))
    with pytest.raises(NanoseekError, match="student is a dense student preset"):
        shapes.model_config("student")
    assert not shapes.is_dense("small")


@pytest.mark.skipif(not RESIDENT_PEAK, reason="needs Linux's /proc/self/clear_refs")
def test_peak_memory_sees_a_tensor_made_and_freed_between_start_and_peak():
    memory = PeakMemory(torch.device("cpu"))
    start = memory.start()
    t = torch.ones(16 << 20)  # 64 MiB, touched
    del t
    assert memory.peak(start) > 60 << 20  # a few pages of it may have been resident already
    start = memory.start()  # the mark is reset: the freed tensor is not seen again
    assert memory.peak(start) < 16 << 20
