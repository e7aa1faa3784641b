"""The code, the docs and the configs stand alone: nothing points at files outside the repo."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Pointers to the notes and files of the sessions that built the project, which a clone lacks.
OUTSIDE = ("SYSTEM.md", "shared/", "issue 6", "issue's notes", "issue notes", "/work/")


def test_nothing_refers_to_files_outside_the_repo():
    files = [
        ROOT / "README.md",
        ROOT / "Makefile",
        ROOT / "pyproject.toml",
        *(ROOT / "src").rglob("*"),
        *(ROOT / "configs").rglob("*"),
    ]
    found = []
    for path in files:
        built = any(part.endswith(".egg-info") or part == "__pycache__" for part in path.parts)
        if path.is_file() and not built and path.suffix in (".py", ".md", ".toml", ".yaml", ".html", ".js", ".css", ""):
            text = path.read_text(encoding="utf-8", errors="replace")
            found += [f"{path.relative_to(ROOT)}: {word}" for word in OUTSIDE if word in text]
    assert not found, found
