"""Every shipped config runs on a fresh clone with the commands its comment shows, in order
(pretraining's first: the others start from its model), and the README shows the same commands.

The commands are read from the comments, run in an empty directory holding only configs/, and
made tiny by swapping their sizes (SHRINK) and adding --set overrides (SMALL), nothing else.
"""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
ORDER = ["pretrain-tiny", "sft-tiny", "grpo-tiny"]
SHRINK = {"--docs": "300", "--conversations": "40", "--vocab-size": "300"}
TRAIN_SMALL = ["steps=2", "batch_size=2", "seq_len=64", "checkpoint_every=2", "log_every=1", "tensorboard=false"]
SMALL = {
    "pretrain": TRAIN_SMALL,
    "sft": TRAIN_SMALL,
    "grpo": [
        "steps=1",
        "prompts=8",
        "prompts_per_step=2",
        "group_size=2",
        "max_new_tokens=8",
        "checkpoint_every=1",
        "tensorboard=false",
        "progress=false",
    ],
}


def commented_commands(name: str) -> list[str]:
    """The `nanoseek ...` commands of a config's leading comment, continuation lines joined."""
    commands, current = [], None
    for line in (ROOT / "configs" / f"{name}.yaml").read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line[1:].strip()
        if current is not None:
            current += " " + text
        elif text.startswith("nanoseek "):
            current = text
        if current is not None and not current.endswith("\\"):
            commands.append(current)
            current = None
        elif current is not None:
            current = current[:-1].rstrip()
    return commands


def readme_commands() -> str:
    """The README's bash blocks, continuation lines joined and comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    return "\n".join(" ".join(line.split("#")[0].split()) for line in text.splitlines())


def tiny(command: str) -> list[str]:
    args = shlex.split(command)[1:]
    for i, a in enumerate(args[:-1]):
        if a in SHRINK:
            args[i + 1] = SHRINK[a]
    for key in SMALL.get(args[0], []):
        args += ["--set", key]
    return args


def test_every_config_shows_its_commands_and_the_readme_shows_them_too():
    readme = readme_commands()
    for name in ORDER:
        commands = commented_commands(name)
        assert any(f"--config configs/{name}.yaml" in c for c in commands), name
        for command in commands:
            assert " ".join(command.split()) in readme, f"configs/{name}.yaml: README lacks `{command}`"


def test_configs_run_with_their_commented_commands_on_a_fresh_clone(tmp_path, monkeypatch, capsys):
    from nanoseek.cli import main
    from nanoseek.data.tokenizer import Tokenizer

    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    ran = []
    for name in ORDER:
        for command in commented_commands(name):
            assert main(tiny(command)) == 0, f"configs/{name}.yaml: `{command}` failed:\n{capsys.readouterr().err}"
            ran.append(shlex.split(command)[1])
    assert ran == ["data", "tokenizer", "pretrain", "data", "sft", "grpo"]
    # each model keeps the prompt format it was trained in: the R1-Zero format of the corpus
    for model in ("runs/pretrain/hf", "runs/sft/hf", "runs/r1-zero/hf"):
        assert (tmp_path / model / "model.safetensors").is_file(), model
        assert Tokenizer.from_pretrained(tmp_path / model).prompt_format == "r1-zero", model


def test_data_chats_writes_conversations_sft_reads(tmp_path, capsys):
    import json

    from nanoseek.cli import main

    out = tmp_path / "chats.jsonl"
    assert (
        main(
            [
                "data",
                "chats",
                "--task",
                "chain",
                "--signed",
                "--max-values",
                "3",
                "--conversations",
                "5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 5
    for row in rows:
        user, assistant = row["messages"]
        assert user["role"] == "user" and re.fullmatch(r"a=-?\d,b=-?\d(,c=-?\d)?\. a\+b(\+c)?", user["content"])
        assert assistant["role"] == "assistant" and assistant["reasoning_content"].endswith("=" + assistant["content"])
    assert main(["data", "chats", "--task", "chain", "--conversations", "0", "--out", str(out)]) == 2
    assert capsys.readouterr().err == "error: --conversations 0: must be at least 1\n"
    assert main(["data", "chats", "--task", "chain", "--out", str(tmp_path / "chats.txt")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'chats.txt'}: conversations are written as .jsonl\n"
    assert main(["data", "chats", "--task", "chain", "--min-ops", "2", "--out", str(out)]) == 2
    assert capsys.readouterr().err == "error: --min-ops is an option of another task than chain\n"


@pytest.mark.parametrize("fmt", ["chat", "r1-zero"])
def test_tokenizer_train_records_the_prompt_format(tmp_path, fmt):
    from nanoseek.cli import main
    from nanoseek.data.tokenizer import Tokenizer

    (tmp_path / "text.txt").write_text("a=1,b=2. a+b\n\nc=3,d=-4. c+d\n", encoding="utf-8")
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--input",
                str(tmp_path / "text.txt"),
                "--vocab-size",
                "300",
                "--prompt-format",
                fmt,
                "--out",
                str(tmp_path / "tok"),
            ]
        )
        == 0
    )
    assert Tokenizer.from_pretrained(tmp_path / "tok").prompt_format == fmt
