"""`nanoseek inspect`: the presets table (the README's numbers, built on the meta device in
well under a second), and a checkpoint summary."""

import argparse
import io
import re
import time
from pathlib import Path

import pytest
from rich.console import Console

from nanoseek.config import ModelConfig
from nanoseek.io.cli import presets_table, run_inspect
from nanoseek.model import count_parameters

README = Path(__file__).resolve().parents[2] / "README.md"


def rendered(table) -> str:
    out = io.StringIO()
    Console(file=out, width=200).print(table)
    return out.getvalue()


def test_parameter_counts_of_the_presets():
    counts = {name: count_parameters(ModelConfig.preset(name)) for name in ("tiny", "small", "v2-lite", "v3")}
    assert counts == {
        "tiny": {"total": 1_417_728, "total_with_mtp": 1_818_848, "active": 688_640},
        "small": {"total": 4_356_928, "total_with_mtp": 5_219_744, "active": 2_243_392},
        "v2-lite": {"total": 15_706_484_224, "total_with_mtp": 15_706_484_224, "active": 2_451_435_008},
        "v3": {"total": 671_026_404_352, "total_with_mtp": 682_636_472_320, "active": 36_625_603_584},
    }
    # tied embeddings count once; no routed experts: every weight is active but the embedding
    tied = ModelConfig.preset("tiny").replace(tie_word_embeddings=True)
    assert count_parameters(tied)["total"] == 1_417_728 - 512 * 128
    dense = count_parameters(ModelConfig.preset("tiny").replace(n_routed_experts=0))
    assert dense["active"] == dense["total"] - 512 * 128


def test_presets_table_matches_the_readme_and_is_quick():
    t0 = time.perf_counter()
    text = rendered(presets_table())
    seconds = time.perf_counter() - t0
    assert seconds < 10, seconds  # 55 s when every expert of V3 was built and initialised on meta
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0] in ("tiny", "small", "v2-lite", "v3"):
            rows[cells[0]] = cells
    readme = {}
    table = README.read_text().split("The presets (`nanoseek inspect --presets`):")[1].split("\n\n")[1]
    for line in table.splitlines():
        m = re.match(r"\| (tiny|small|v2-lite|v3) ", line)
        if m:
            readme[m.group(1)] = [c.strip() for c in line.strip("|").split("|")]
    assert len(readme) == 4 and rows == readme


@pytest.fixture
def transformers_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    config = transformers.DeepseekV3Config(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=24,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=12,
        n_routed_experts=16,
    )
    transformers.DeepseekV3ForCausalLM(config).save_pretrained(tmp_path)
    return tmp_path


def test_inspect_a_checkpoint_saved_by_transformers(transformers_checkpoint, capsys):
    args = argparse.Namespace(model=str(transformers_checkpoint), presets=False, config_only=False)
    assert run_inspect(args) == 0
    captured = capsys.readouterr()
    assert "loading without MTP" in captured.err
    assert re.search(r"num_nextn_predict_layers\s*│\s*0\s*│", captured.out), captured.out
    assert "loaded in" in captured.out
    args.config_only = True  # config.json as written: it declares one MTP module
    assert run_inspect(args) == 0
    assert re.search(r"num_nextn_predict_layers\s*│\s*1\s*│", capsys.readouterr().out)
