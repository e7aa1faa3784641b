"""`nanoseek demo` (what `make demo` runs) and the CLI's help."""

import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "nanoseek.cli", *args], capture_output=True, text=True, timeout=600)


def test_demo_saves_reloads_and_prints_the_presets_table(tmp_path):
    r = run("demo", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "reloaded by nanoseek, max |logit diff| = 0.00e+00" in r.stdout
    for preset in ("tiny", "small", "v2-lite", "v3"):
        assert preset in r.stdout
    assert "671.03B" in r.stdout and "56.9x" in r.stdout
    assert (tmp_path / "tiny-hf" / "config.json").exists()


def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0 and "demo" in r.stdout and "inspect" in r.stdout
