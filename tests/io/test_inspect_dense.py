"""`nanoseek inspect` on the dense students: a Qwen2 or Llama directory written by transformers
(shape, parameters, KV-cache bytes per token of grouped-query attention), and the R1-Distill
presets beside DeepSeek's."""

import json

import pytest

from nanoseek.cli import main


def rows(text: str) -> dict[str, str]:
    """The field/value rows of a two-column rich table."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 2:
            out[cells[0]] = cells[1]
    return out


def table_rows(text: str, first: str) -> dict[str, list[str]]:
    """Rows of a many-column rich table keyed by their first cell, for the first cells starting with `first`."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0].startswith(first):
            out[cells[0]] = cells
    return out


@pytest.fixture(scope="module")
def transformers():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def test_inspect_a_qwen2_directory_written_by_transformers(transformers, tmp_path, capsys):
    config = transformers.Qwen2Config(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    model = transformers.Qwen2ForCausalLM(config)
    model.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--dtype", "float32"]) == 0
    r = rows(capsys.readouterr().out)
    assert r["architecture"] == "Qwen2ForCausalLM"
    assert (r["num_hidden_layers"], r["num_attention_heads"], r["num_key_value_heads"], r["head_dim"]) == (
        "3",
        "4",
        "2",
        "16",
    )
    # transformers' own count (the tied head once): 96*64 embedding + 3 layers + the final norm
    assert model.num_parameters() == 99_136
    assert r["parameters"] == "99,136"
    assert r["KV cache bytes / token (GQA, bf16)"] == f"{3 * 2 * 2 * 16 * 2:,}"  # 384
    assert r["KV cache bytes / token (GQA, float32)"] == f"{3 * 2 * 2 * 16 * 4:,}"  # 768
    assert r["weights"].startswith("loaded in")
    assert r["weight bytes (float32)"] == f"{99_136 * 4:,}"

    assert main(["inspect", str(tmp_path), "--dtype", "bfloat16"]) == 0
    r = rows(capsys.readouterr().out)
    assert r["weight bytes (bfloat16)"] == f"{99_136 * 2:,}"
    assert not any("float32" in k for k in r)


def test_inspect_a_llama3_directory_config_only(transformers, tmp_path, capsys):
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,  # not hidden_size / heads: the KV bytes must use the config's head_dim
        max_position_embeddings=256,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    )
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--config-only"]) == 0
    r = rows(capsys.readouterr().out)
    assert (r["architecture"], r["head_dim"], r["rope_scaling"]) == ("LlamaForCausalLM", "32", "llama3")
    assert r["parameters"] == f"{model.num_parameters():,}"
    assert r["KV cache bytes / token (GQA, bf16)"] == f"{2 * 2 * 2 * 32 * 2:,}"  # 512
    assert "weights" not in r


def test_inspect_a_dense_directory_missing_a_field_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["Qwen2ForCausalLM"], "vocab_size": 96, "num_hidden_layers": 2})
    )
    assert main(["inspect", str(tmp_path), "--config-only"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "config.json: missing required fields 'hidden_size', 'intermediate_size', 'num_attention_heads'" in err


def test_presets_list_the_dense_students_beside_deepseek(capsys):
    assert main(["inspect", "--presets"]) == 0
    out = capsys.readouterr().out
    assert "v3" in table_rows(out, "v3")  # DeepSeek's table is still there
    dense = table_rows(out, "r1-distill") | table_rows(out, "student")
    params = {name: cells[4] for name, cells in dense.items()}
    assert params == {
        "student": "0.31M",
        "r1-distill-qwen-1.5b": "1.78B",
        "r1-distill-qwen-7b": "7.62B",
        "r1-distill-qwen-14b": "14.77B",
        "r1-distill-qwen-32b": "32.76B",
        "r1-distill-llama-8b": "8.03B",
        "r1-distill-llama-70b": "70.55B",
    }
    # KV GQA bytes per token in bf16: 28 layers x 2 x 2 KV heads x 128 x 2 bytes; 80 x 2 x 8 x 128 x 2
    assert dense["r1-distill-qwen-1.5b"][1:4] == ["Qwen2ForCausalLM", "28", "12/2"]
    assert dense["r1-distill-qwen-1.5b"][5:] == ["28,672", "172,032", "6.0x"]
    assert dense["r1-distill-llama-70b"][1:4] == ["LlamaForCausalLM", "80", "64/8"]
    assert dense["r1-distill-llama-70b"][5:] == ["327,680", "2,621,440", "8.0x"]
