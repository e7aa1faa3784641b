"""Training configs (YAML + --set, errors that name the key) and the learning-rate schedules."""

import pytest

from nanoseek.cli import main
from nanoseek.errors import NanoseekError
from nanoseek.train.config import load_config, save_config
from nanoseek.train.schedule import lr_at


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides(tmp_path):
    cfg = load_config(
        write(tmp_path, "steps: 50\nlr: 3e-4\ndata:\n  files: [a.jsonl]\nmodel:\n  preset: small\n"),
        ["seq_len=32", "data.tokenizer=123", "model.hidden_size=64", "lr=1e-3", "data.files=[b, c]"],
    )
    assert cfg.steps == 50 and cfg.seq_len == 32 and cfg.lr == 1e-3
    assert cfg.data.files == ["b", "c"] and cfg.data.tokenizer == "123"
    mc = cfg.to_model_config()
    assert mc.hidden_size == 64 and mc.vocab_size == 4096  # the rest from the small preset


@pytest.mark.parametrize(
    "text, overrides, key",
    [
        ("stepz: 5\n", [], "stepz"),
        ("data:\n  filez: [a]\n", [], "data.filez"),
        ("model:\n  hidden: 3\n", [], "model.hidden"),
        ("steps: ten\n", [], "steps"),
        ("steps: 1.5\n", [], "steps"),
        ("tensorboard: 3\n", [], "tensorboard"),
        ("data:\n  files: a.jsonl\n", [], "data.files"),
        ("model:\n  hidden_size: wide\n", [], "model.hidden_size"),
        ("", ["lr=fast"], "lr"),
        ("", ["nope=1"], "nope"),
        ("", ["data.nope=1"], "data.nope"),
        ("", ["steps=0"], "steps"),
        ("", ["precision=fp16"], "precision"),
        ("", ["model.preset=huge"], "model.preset"),
    ],
)
def test_errors_name_the_key(tmp_path, text, overrides, key):
    with pytest.raises(NanoseekError, match=f"'{key}'"):
        load_config(write(tmp_path, text), overrides)


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("lr: -1\n", [], "{path}: config key 'lr': must be at least 0, got -1"),
        ("steps: ten\n", [], "{path}: config key 'steps' expects an integer, got 'ten'"),
        ("data:\n  files: [a, 3]\n", [], "{path}: config key 'data.files[1]' expects a string, got 3"),
        (
            "data:\n  filez: [a]\n",
            [],
            "{path}: unknown config key 'data.filez' (known: files, messages_field, shuffle, text_field, tokenizer)",
        ),
        (
            "model:\n  hidden: 3\n",
            [],
            "{path}: unknown config key 'model.hidden' (a ModelConfig or DenseConfig field, or 'preset')",
        ),
        ("beta2: 1\nlr: -1\n", [], "{path}: config key 'lr': must be at least 0, got -1 (and 1 more)"),
        (
            "",
            ["precision=fp16"],
            "--set precision=fp16: config key 'precision': must be one of 'fp32', 'bf16', 'fp8', got 'fp16'",
        ),
        ("steps: 5\n", ["steps.x=1"], "--set steps.x=1: config key 'steps' is not a section"),
        (
            "decay_fraction: 0.8\n",
            ["tail_fraction=0.5"],
            "{path}: config key 'decay_fraction': decay_fraction 0.8 and tail_fraction 0.5 add up to more than 1",
        ),
    ],
)
def test_exact_one_line_messages(tmp_path, text, overrides, message):
    path = write(tmp_path, text)
    with pytest.raises(NanoseekError) as e:
        load_config(path, overrides)
    assert str(e.value) == message.format(path=path)


def test_checks_across_keys_see_every_override(tmp_path):
    """A file is checked with its overrides in: lr 1e-4 from the file and min_lr from --set."""
    path = write(tmp_path, "lr: 1e-4\n")
    assert load_config(path, ["min_lr=1e-5"]).min_lr == 1e-5
    with pytest.raises(NanoseekError) as e:
        load_config(path, ["min_lr=1e-3"])
    assert str(e.value) == "--set min_lr=1e-3: config key 'min_lr': 0.001 is above lr 0.0001"


def test_configs_built_in_python_fail_the_same_way():
    from nanoseek.train.config import DataConfig, TrainConfig
    from nanoseek.train.grpo import GRPOConfig

    with pytest.raises(NanoseekError) as e:
        TrainConfig(data={"files": "a.jsonl"})
    assert str(e.value) == "config key 'data.files' expects a list, got 'a.jsonl'"
    with pytest.raises(NanoseekError, match="^config key 'files' expects a list"):
        DataConfig(files="a.jsonl")
    with pytest.raises(NanoseekError, match="^unknown config key 'gruop_size'"):
        GRPOConfig(gruop_size=4)
    assert GRPOConfig(loss_type="dapo").dynamic_sampling and not GRPOConfig().dynamic_sampling


def test_save_and_load_round_trip(tmp_path):
    from nanoseek.train.grpo import GRPORunConfig

    cfg = load_config(
        None,
        [
            "model.hidden_size=64",
            "data.files=[a.jsonl]",
            "data.tokenizer=7",
            "lr=3e-4",
            "micro_batch_size=4",
            "precision=bf16",
        ],
    )
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and again.model == {"hidden_size": 64} and again.data.tokenizer == "7"
    grpo = load_config(
        None, [f"init_from={tmp_path}", "task_options={max_len: 5}", "stop=[END]", "loss_type=dapo"], cls=GRPORunConfig
    )
    save_config(grpo, tmp_path / "grpo.yaml")
    assert load_config(tmp_path / "grpo.yaml", cls=GRPORunConfig) == grpo


def test_precision_values():
    assert load_config(None, ["precision=fp8"]).precision == "fp8"
    assert load_config(None, ["precision=bf16"]).precision == "bf16"
    with pytest.raises(NanoseekError, match="'precision'"):
        load_config(None, ["precision=fp16"])


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    code = main(["pretrain", "--config", str(write(tmp_path, "batchsize: 4\n")), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "'batchsize'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_sft_needs_init_from(tmp_path, capsys):
    path = write(tmp_path, "steps: 5\n")
    code = main(["sft", "--config", str(path), "--out", str(tmp_path / "o")])
    assert code == 2 and capsys.readouterr().err.strip() == (
        f"error: {path}: config key 'init_from': SFT starts from a pretrained model directory (the hf/ folder that "
        "`nanoseek pretrain` writes)"
    )


def test_wsd_schedule_shape():
    total, lr, low = 100, 1e-3, 1e-4
    lrs = [
        lr_at(s, total, lr, low, warmup=10, schedule="wsd", decay_fraction=0.3, tail_fraction=0.1) for s in range(total)
    ]
    assert lrs[0] == pytest.approx(lr / 10) and lrs[9] == pytest.approx(lr)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # warm-up rises
    assert all(v == lr for v in lrs[10:60])  # constant
    decay = lrs[60:90]
    assert all(a > b for a, b in zip(decay, decay[1:])) and decay[0] <= lr  # cosine decay
    assert all(v == low for v in lrs[90:])  # low tail


def test_cosine_schedule_shape():
    lrs = [lr_at(s, 50, 1.0, 0.1, warmup=5, schedule="cosine") for s in range(50)]
    assert lrs[4] == 1.0
    assert all(a > b for a, b in zip(lrs[5:], lrs[6:]))
    assert lrs[-1] == pytest.approx(0.1, abs=2e-3)


@pytest.mark.parametrize("name", ["pretrain-tiny", "sft-tiny", "grpo-tiny"])
def test_shipped_configs_load_and_match_the_demo(name, tmp_path):
    """configs/*.yaml are valid configs, and the tiny pretraining and GRPO ones are the demo's recipe."""
    from pathlib import Path

    from nanoseek.demo import FULL
    from nanoseek.train.grpo import GRPORunConfig
    from nanoseek.train.sft import SFTConfig

    path = Path(__file__).parents[2] / "configs" / f"{name}.yaml"
    overrides = [f"init_from={tmp_path}"] if name != "pretrain-tiny" else []  # they start from a pretrained model
    cfg = load_config(path, overrides, cls={"grpo-tiny": GRPORunConfig, "sft-tiny": SFTConfig}.get(name))
    if name == "pretrain-tiny":
        assert (cfg.steps, cfg.batch_size, cfg.seq_len, cfg.document_mask) == (
            FULL.pretrain_steps,
            FULL.batch_size,
            FULL.seq_len,
            True,
        )
    if name == "grpo-tiny":
        assert cfg.task == "chain" and cfg.task_options == dict(FULL.task_options)
        assert (cfg.steps, cfg.prompts_per_step, cfg.group_size, cfg.max_new_tokens, cfg.lr, cfg.loss_type) == (
            FULL.grpo_steps,
            FULL.prompts_per_step,
            FULL.group_size,
            FULL.max_new_tokens,
            FULL.grpo_lr,
            FULL.loss_type,
        )


# ---- hyperparameters that cannot be right (issue 14) --------------------------------------
@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("lr: .inf\n", [], "{path}: config key 'lr' expects a finite number, got inf"),
        ("lr: .nan\n", [], "{path}: config key 'lr' expects a finite number, got nan"),
        ("lr: -0.1\n", [], "{path}: config key 'lr': must be at least 0, got -0.1"),
        ("mtp_lambda: -1\n", [], "{path}: config key 'mtp_lambda': must be at least 0, got -1"),
        ("mtp_lambda: .inf\n", [], "{path}: config key 'mtp_lambda' expects a finite number, got inf"),
        ("", ["lr=inf"], "--set lr=inf: config key 'lr' expects a finite number, got 'inf'"),
        ("", ["mtp_lambda=nan"], "--set mtp_lambda=nan: config key 'mtp_lambda' expects a finite number, got 'nan'"),
        ("steps: 5\nlr: 1e-3\nsteps: 6\n", [], "{path}: duplicate key 'steps' (lines 1 and 3)"),
        (
            "data:\n  files: [a]\n  tokenizer: x\n  files: [b]\n",
            [],
            "{path}: duplicate key 'data.files' (lines 2 and 4)",
        ),
        (
            "model:\n  hidden_size: 0\n",
            [],
            "{path}: config key 'model.hidden_size': hidden_size must be a positive integer, got 0",
        ),
        (
            "",
            ["model.hidden_size=0"],
            "--set model.hidden_size=0: config key 'model.hidden_size': hidden_size must be a positive integer, got 0",
        ),
        (
            "model:\n  rms_norm_eps: .inf\n",
            [],
            "{path}: config key 'model.rms_norm_eps' expects a finite number, got inf",
        ),
    ],
)
def test_values_that_cannot_be_right_are_refused_naming_the_key(tmp_path, text, overrides, message):
    """An lr of .inf used to train a model of NaNs with exit 0; YAML kept a duplicate's last value."""
    path = write(tmp_path, text)
    with pytest.raises(NanoseekError) as e:
        load_config(path, overrides)
    assert str(e.value) == message.format(path=path)


def test_a_yaml_merge_key_then_the_key_is_an_override_not_a_duplicate(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  <<: {hidden_size: 32, num_hidden_layers: 3}\n  hidden_size: 64\n"))
    mc = cfg.to_model_config()
    assert (mc.hidden_size, mc.num_hidden_layers) == (64, 3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["temperature=-1"], "--set temperature=-1: config key 'temperature': must be at least 0, got -1"),
        (
            ["rewards={accuracy: -1}"],
            "--set rewards={accuracy: -1}: config key 'rewards': the weight of accuracy must be at least 0, got -1",
        ),
        (
            ["max_new_tokens=5", "min_new_tokens=10"],
            "--set min_new_tokens=10: config key 'min_new_tokens': 10 is above max_new_tokens 5",
        ),
        (["grad_clip=0"], "--set grad_clip=0: config key 'grad_clip': must be above 0, got 0"),
        (["lr=inf"], "--set lr=inf: config key 'lr' expects a finite number, got 'inf'"),
    ],
)
def test_grpo_values_that_cannot_be_right(tmp_path, overrides, message):
    from nanoseek.train.grpo import GRPORunConfig

    with pytest.raises(NanoseekError) as e:
        load_config(None, [f"init_from={tmp_path}", *overrides], cls=GRPORunConfig)
    assert str(e.value) == message


def test_grpo_config_built_in_python_refuses_the_same():
    from nanoseek.train.grpo import GRPOConfig

    with pytest.raises(NanoseekError, match=r"^config key 'temperature': must be at least 0, got -1$"):
        GRPOConfig(temperature=-1)
    with pytest.raises(NanoseekError, match=r"^config key 'min_new_tokens': 10 is above max_new_tokens 5$"):
        GRPOConfig(min_new_tokens=10, max_new_tokens=5)
    assert GRPOConfig(temperature=0).temperature == 0  # greedy rollouts are allowed


def test_cli_refuses_an_infinite_lr_before_training(tmp_path, capsys):
    out = tmp_path / "o"
    code = main(["pretrain", "--config", str(write(tmp_path, "steps: 2\n")), "--set", "lr=inf", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: --set lr=inf: config key 'lr' expects a finite number, got 'inf'\n"
    assert not out.exists()
    dup = tmp_path / "dup.yaml"
    dup.write_text("lr: 1e-3\nsteps: 2\nlr: 1e-4\n")
    assert main(["pretrain", "--config", str(dup), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {dup}: duplicate key 'lr' (lines 1 and 3)\n" and not out.exists()


def test_a_config_that_is_not_utf8_is_one_line_naming_the_path(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"lr: 1e-3\n# caf\xe9\n")
    with pytest.raises(NanoseekError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: not UTF-8 text (byte 0xe9 at offset 14)"
    assert main(["pretrain", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: not UTF-8") and len(err.splitlines()) == 1


# ---- more numbers that cannot be right: loss weights, the model section, GRPO's weights ----
@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("balance_alpha: -0.0001\n", [], "{path}: config key 'balance_alpha': must be at least 0, got -0.0001"),
        ("balance_alpha: .inf\n", [], "{path}: config key 'balance_alpha' expects a finite number, got inf"),
        ("bias_gamma: .nan\n", [], "{path}: config key 'bias_gamma' expects a finite number, got nan"),
        ("min_lr: .inf\n", [], "{path}: config key 'min_lr' expects a finite number, got inf"),
        ("grad_clip: .inf\n", [], "{path}: config key 'grad_clip' expects a finite number, got inf"),
        ("", ["lr=.nan"], "--set lr=.nan: config key 'lr' expects a finite number, got nan"),
        ("model:\n  rope_theta: .inf\n", [], "{path}: config key 'model.rope_theta' expects a finite number, got inf"),
        (
            "model:\n  rope_theta: -10000.0\n",
            [],
            "{path}: config key 'model.rope_theta': rope_theta must be a finite number above 0, got -10000.0",
        ),
        (
            "",
            ["model.num_experts_per_tok=9"],
            "--set model.num_experts_per_tok=9: config key 'model.num_experts_per_tok': "
            "num_experts_per_tok 9 must be in 1..n_routed_experts",
        ),
    ],
)
def test_loss_weights_and_model_numbers_that_cannot_be_right_name_the_key(tmp_path, text, overrides, message):
    path = write(tmp_path, text)
    with pytest.raises(NanoseekError) as e:
        load_config(path, overrides)
    assert str(e.value) == message.format(path=path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("model:\n  preset: tiny\n  hidden_size: 64\n  'hidden_size': 32\n", "'model.hidden_size' (lines 3 and 4)"),
        ("data:\n  files: [a]\ndata:\n  shuffle: false\n", "'data' (lines 1 and 3)"),
    ],
)
def test_a_key_given_twice_quoted_or_as_a_section_names_it(tmp_path, text, message):
    """A quoted key is the same key; a section given twice would drop the first one's keys."""
    path = write(tmp_path, text)
    with pytest.raises(NanoseekError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: duplicate key {message}"


def test_a_key_given_twice_inside_one_set_value_names_it_from_the_top():
    """One line, no line numbers (the value is one line), the key dotted as --set spells it."""
    with pytest.raises(NanoseekError) as e:
        load_config(None, ["data={files: [a.jsonl], files: [b.jsonl]}"])
    assert str(e.value) == "--set data={files: [a.jsonl], files: [b.jsonl]}: duplicate key 'data.files'"
    with pytest.raises(NanoseekError) as e:
        load_config(None, ["model={hidden_size: 64, hidden_size: 32}"])
    assert str(e.value) == "--set model={hidden_size: 64, hidden_size: 32}: duplicate key 'model.hidden_size'"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": float("nan")}, "config key 'temperature' expects a finite number, got nan"),
        ({"beta": -0.04}, "config key 'beta': must be at least 0, got -0.04"),
        ({"beta": float("inf")}, "config key 'beta' expects a finite number, got inf"),
        ({"epsilon": float("nan")}, "config key 'epsilon' expects a finite number, got nan"),
        ({"epsilon": -0.2}, "config key 'epsilon': must be at least 0, got -0.2"),
        ({"epsilon_high": -0.28}, "config key 'epsilon_high': must be at least 0, got -0.28"),
    ],
)
def test_grpo_loss_weights_that_cannot_be_right_are_refused(kwargs, message):
    from nanoseek.train.grpo import GRPOConfig

    with pytest.raises(NanoseekError) as e:
        GRPOConfig(**kwargs)
    assert str(e.value) == message


@pytest.mark.parametrize(
    "override, message",
    [
        ("rewards={accuracy: .nan}", "config key 'rewards.accuracy' expects a finite number, got nan"),
        ("rewards.format=.inf", "config key 'rewards.format' expects a finite number, got inf"),
    ],
)
def test_grpo_reward_weights_must_be_finite(tmp_path, override, message):
    """A NaN weight passes `w < 0`: the finite check is what refuses it."""
    from nanoseek.train.grpo import GRPORunConfig

    with pytest.raises(NanoseekError) as e:
        load_config(None, [f"init_from={tmp_path}", override], cls=GRPORunConfig)
    assert str(e.value) == f"--set {override}: {message}"
