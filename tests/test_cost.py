"""`nanoseek cost`: DeepSeek-V3's reported run reproduced, FLOPs per token against hand counts,
serving figures, the report cards' cost rows, and one-line errors for bad input."""

import json
import re
from pathlib import Path

import pytest

from nanoseek import cost
from nanoseek.cli import main
from nanoseek.config import ModelConfig
from nanoseek.dense import DenseConfig, count_dense_parameters

README = Path(__file__).resolve().parents[1] / "README.md"


def run(capsys, *args) -> tuple[int, str, str]:
    rc = main(["cost", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_v3_table_reproduces_the_reported_gpu_hours_and_dollars(capsys):
    t = cost.v3_training(ModelConfig.preset("v3"), mfu=None, precision="fp8", price=2.0)
    assert t["reported"]["total"] == 2_788_000 and t["reported_dollars"] == 5_576_000
    assert abs(t["computed"]["total"] / 2_788_000 - 1) < 0.10
    assert abs(t["dollars"] / 5_576_000 - 1) < 0.10
    # The MFU is fitted to pretraining's 180K GPU-hours per trillion tokens; context extension
    # (1000 steps of 1920 x 32K, 1000 of 480 x 128K tokens) is a check of the attention term.
    assert t["computed"]["pretraining"] == pytest.approx(2_664_000)
    assert abs(t["computed"]["context extension"] / 119_000 - 1) < 0.10
    assert [r["tokens"] for r in t["rows"][1:]] == [1000 * 1920 * 32768, 1000 * 480 * 131072]
    assert 0.20 < t["mfu"] < 0.25  # of the H800's dense FP8 peak
    assert t["mfu"] == pytest.approx(t["flops_per_token"] * 1e12 / (180e3 * 3600 * 1978.9e12))

    rc, out, err = run(capsys, "--preset", "v3")
    assert rc == 0 and err == ""
    total = re.search(r"total H800 GPU-hours\s+2,788\.0K\s+([\d,.]+)K\s+([\d.]+)", out)
    dollars = re.search(r"dollars at \$2/GPU-hour\s+\$5\.576M\s+\$([\d.]+)M\s+([\d.]+)", out)
    assert (
        total
        and abs(float(total[1].replace(",", "")) / 2788 - 1) < 0.10
        and float(total[2]) == pytest.approx(1, abs=0.1)
    )
    assert dollars and abs(float(dollars[1]) / 5.576 - 1) < 0.10
    flat = " ".join(out.split())  # prose lines are wrapped
    assert f"MFU {t['mfu']:.1%} of the FP8 peak" in flat
    assert "nor R1's reinforcement learning" in flat and "research and ablation runs" in flat
    assert "DeepSeek's published decode throughput" in out


def test_a_given_mfu_moves_every_row(capsys):
    t = cost.v3_training(ModelConfig.preset("v3"), mfu=0.2, precision="fp8", price=2.0)
    fitted = cost.v3_training(ModelConfig.preset("v3"), mfu=None, precision="fp8", price=2.0)
    assert t["computed"]["pretraining"] == pytest.approx(fitted["computed"]["pretraining"] * fitted["mfu"] / 0.2)
    rc, out, _ = run(capsys, "--preset", "v3", "--mfu", "0.2")
    out = " ".join(out.split())  # prose lines are wrapped
    assert rc == 0 and "MFU 20.0% of the FP8 peak" in out and "given (the paper implies 22.8%)" in out


def test_flops_per_token_of_the_tiny_preset_by_hand():
    c = ModelConfig.preset("tiny")  # hidden 128, 4 layers (1 dense), 4 heads, 8 experts (2 active), 1 MTP
    attention = (
        (128 * 64 + 64) + 64 * 4 * 32 + (128 * 48 + 32) + 32 * 4 * 32 + 4 * 16 * 128
    )  # q_a+norm, q_b, kv_a+norm, kv_b, o
    norms = 2 * 128
    dense_ffn = 3 * 128 * 384
    moe_active = 8 * 128 + 3 * 128 * 96 + 2 * 3 * 128 * 96  # gate, the shared expert, 2 routed
    head = 512 * 128
    main_active = (attention + norms + dense_ffn) + 3 * (attention + norms + moe_active) + 128 + head
    mtp_active = 2 * 128 + 2 * 128 * 128 + 128 + (attention + norms + moe_active) + head  # norms, eh_proj, its block
    assert cost.active_parameters(c) == {"main": main_active, "mtp": mtp_active, "embedding": 512 * 128}
    assert main_active == 688_640
    width = 4 * (32 + 16)  # heads x (qk_nope + qk_rope + v_head)
    assert cost.flops_per_token(c, 256) == 6 * (main_active + mtp_active) + 6 * 5 * width * 256
    assert cost.flops_per_token(c, 256) == 7_079_232
    assert cost.flops_per_token(c, 256, mtp=False) == 6 * main_active + 6 * 4 * width * 256
    assert cost.flops_per_token(c, 256, backward=False) == 2 * main_active + 2 * 4 * width * 256


def test_a_dense_preset_costs_as_its_hand_count(capsys):
    c = DenseConfig.preset("r1-distill-qwen-7b")  # Qwen2.5-Math-7B's shape
    h, kv = 3584, 4 * 128
    per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * 18944 + 2 * h  # q, k, v (biases), o, MLP, norms
    total = 28 * per_layer + h + 2 * 152064 * h
    assert count_dense_parameters(c) == total == 7_615_616_512
    active = total - 152064 * h  # the embedding is a lookup; the untied head multiplies
    per_token = 6 * active + 6 * 28 * (28 * 2 * 128) * 4096
    assert cost.flops_per_token(c, 4096) == per_token
    hours = 1e12 * per_token / (989.4e12 * 0.4 * 3600)
    assert cost.gpu_hours(1e12 * per_token, cost.GPUS["h100"], "bf16", 0.4) == pytest.approx(hours)

    rc, out, err = run(capsys, "--preset", "r1-distill-qwen-7b", "--tokens", "1T", "--gpu", "h100", "--mfu", "0.4")
    assert rc == 0 and err == ""
    assert f"{cost.hours(hours)} GPU-hours, {cost.money(hours * 2)} at $2/GPU-hour" in out
    assert "KV cache: 57,344 bytes per token" in out  # 28 layers x 2 x 4 KV heads x 128 x 2 bytes


def test_v3_serving_against_deepseeks_published_throughput():
    c = ModelConfig.preset("v3")
    s = cost.serving(c, cost.GPUS["h800"], "fp8", 2.0, context=4096, gpus=144, batch=None)
    assert s["kv_bytes_per_token"] == 61 * (512 + 64) * 2
    assert s["weight_bytes"] == cost.total_parameters(c)
    # DeepSeek's 14.8K output tokens/s per 8-GPU node at $2/GPU-hour: $16 an hour for 53.3M tokens.
    assert cost.dollars_per_million(14.8e3 / 8, 2.0) == pytest.approx(16 / (14.8e3 * 3600) * 1e6)
    assert f"{cost.dollars_per_million(14.8e3 / 8, 2.0):.3f}" == "0.300"
    assert s["roofline_tps_per_gpu"] * 8 > 14.8e3  # the roofline bounds what was measured
    assert s["batch"] == s["fits"] == int((0.9 * 80e9 - s["weight_bytes"] / 144) // (s["kv_bytes_per_token"] * 4096))


def test_grpo_step_flops_by_hand():
    c = ModelConfig.preset("tiny")

    def f(t, backward):
        return cost.flops_per_token(c, t, mtp=False, backward=backward)

    # Two groups: prompt 3 with completions 2 and 4 (kept), prompt 5 with completion 1 (dropped).
    got = cost.grpo_step_flops(c, [3, 5], [[2, 4], [1]], kept=[0], train_passes=2, forwards=1)
    forward0 = 3 * f(3, False) + 2 * f(5, False) + 4 * f(7, False)
    train0 = 3 * f(3, True) + 2 * f(5, True) + 4 * f(7, True)
    forward1 = 5 * f(5, False) + 1 * f(6, False)
    assert got == pytest.approx(forward0 + 2 * train0 + forward0 + forward1)


def test_report_rows_price_a_runs_flops(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "summary.json").write_text(json.dumps({"tokens": 1000, "flops": 3.6e15, "seconds": 10.0}))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "summary.json").write_text(json.dumps({"tokens": 5, "seconds": 1.0}))
    rows = cost.run_costs([("a", tmp_path / "a"), ("old", tmp_path / "old"), ("absent", tmp_path / "none")])
    assert [r["run"] for r in rows] == ["a", "old"]
    a = rows[0]
    assert a["flops_per_s"] == 3.6e14
    assert a["rented_seconds"] == pytest.approx(3.6e15 / (989.4e12 * 0.4))
    assert a["rented_dollars"] == pytest.approx(a["rented_seconds"] / 3600 * 2.0)
    assert rows[1]["flops"] is None and rows[1]["rented_dollars"] is None
    md = "\n".join(cost.cost_markdown(rows))
    assert "| a | 1,000 | 3.6e15 | 10 | 3.6e14 |" in md and "| old | 5 | n/a |" in md and "H100 SXM5 at 40% MFU" in md


@pytest.mark.parametrize(
    "args, said",
    [
        (["--preset", "v3", "--gpu", "b200"], "--gpu 'b200': unknown GPU (choose from h800, h100, a100)"),
        (["--preset", "tiny", "--tokens", "1B", "--mfu", "1.5"], "--mfu 1.5: must be in (0, 1]"),
        (["--preset", "tiny", "--tokens", "1B", "--mfu", "0"], "--mfu 0: must be in (0, 1]"),
        (["--preset", "tiny", "--tokens", "-5"], "--tokens '-5': expected a count of at least 0"),
        (["--preset", "tiny", "--tokens", "lots"], "--tokens 'lots': expected a count of at least 0"),
        (["--preset", "nope"], "--preset 'nope': unknown preset"),
        (["--preset", "v3", "--tokens", "1T", "--gpu", "a100", "--precision", "fp8"], "has no FP8 tensor cores"),
        (["--preset", "v3", "--gpus", "1"], "--gpus 1: the weights (671.0 GB in fp8) leave no memory"),
        (["--model", "/no/such/dir"], "--model /no/such/dir: no config.json there"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(capsys, args, said):
    rc, out, err = run(capsys, *args)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and said in err, err


def test_the_readme_shows_what_the_command_prints(capsys):
    block = README.read_text(encoding="utf-8").split("### Cost", 1)[1].split("```", 2)[1]
    shown = [line for line in block.splitlines() if line.strip() and not line.startswith("$ ")]
    _, out, _ = run(capsys, "--preset", "v3")
    printed = out.splitlines()
    assert len(shown) > 10 and all(line in printed for line in shown), [x for x in shown if x not in printed]


def test_a_model_directory_costs_as_its_preset(tmp_path, capsys):
    for name, config_json in (
        ("tiny", ModelConfig.preset("tiny").to_hf()),
        ("student", DenseConfig.preset("student").to_hf_dict()),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config_json))
        _, from_dir, _ = run(capsys, "--model", str(tmp_path / name), "--tokens", "2B")
        _, from_preset, _ = run(capsys, "--preset", name, "--tokens", "2B")
        flat = " ".join(from_dir.split()).replace(str(tmp_path / name), name)  # wrapped at other places
        assert flat == " ".join(from_preset.split())
        assert "training on 2B tokens" in from_dir
