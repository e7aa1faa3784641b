"""Problems from local files in the public GSM8K and MATH layouts, read through `datasets`.

GSM8K rows: {"question", "answer"} where the answer ends in "#### N".
MATH rows: {"problem", "solution", "level"?, "type"?} where the solution holds \\boxed{answer}.
.jsonl and .parquet files work (several files or a glob too). Without a path, the small
hand-written samples in nanoseek/assets are used, so tests need no download.
"""

from __future__ import annotations

import random
import re
from importlib import resources
from pathlib import Path

from nanoseek.errors import NanoseekError
from nanoseek.rewards import last_boxed
from nanoseek.tasks import Problem, Task, check_split, split_of

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def asset(name: str) -> Path:
    return Path(str(resources.files("nanoseek") / "assets" / name))


def load_records(path: str | Path | list) -> list[dict]:
    """All rows of local .jsonl/.json/.parquet files (one kind at a time), via `datasets`."""
    paths = [str(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
    kinds = {BUILDERS.get(Path(p).suffix) for p in paths}
    if None in kinds or len(kinds) != 1:
        raise NanoseekError(f"{', '.join(paths)}: expected .jsonl or .parquet files, one kind at a time")
    for p in paths:
        if not any(c in p for c in "*?[") and not Path(p).is_file():
            raise NanoseekError(f"{p}: no such file")
    import datasets

    bars = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(kinds.pop(), data_files=paths, split="train")
    except Exception as e:
        raise NanoseekError(
            f"{', '.join(paths)}: cannot read ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from e
    finally:
        if bars:
            datasets.enable_progress_bars()
    try:
        return ds.to_list()
    except UnicodeDecodeError:  # pyarrow reads JSON bytes as they are and decodes them only here
        raise _not_utf8(paths) from None


def _not_utf8(paths: list[str]) -> NanoseekError:
    """The error that names the file and line that are not UTF-8 (read again only on failure)."""
    from glob import glob

    from nanoseek.data.stream import read_lines

    for p in paths:
        for f in sorted(glob(p)) if any(c in p for c in "*?[") else [p]:
            try:
                for _ in read_lines(Path(f)):
                    pass
            except NanoseekError as e:
                return e
    return NanoseekError(f"{', '.join(paths)}: not UTF-8 text")


class FileTask(Task):
    layout: tuple[str, ...] = ()  # required fields
    sample_file = ""

    def __init__(self, path: str | Path | list | None = None, test_share: float = 0.2):
        if not 0 <= test_share < 1:
            raise NanoseekError(f"{self.name}: test_share {test_share} must be in [0, 1)")
        self.path = path if path is not None else asset(self.sample_file)
        self.test_share = test_share
        self.problems: dict[str, list[Problem]] = {"train": [], "test": []}
        seen: set[str] = set()
        for i, row in enumerate(load_records(self.path)):
            missing = [f for f in self.layout if not isinstance(row.get(f), str)]
            if missing:
                raise NanoseekError(
                    f"{self.path}: row {i + 1} lacks string field {', '.join(missing)} "
                    f"(a {self.name} file has {', '.join(self.layout)})"
                )
            problem = self.to_problem(row, i)
            if problem.prompt not in seen:
                seen.add(problem.prompt)
                self.problems[split_of(problem.prompt, test_share)].append(problem)

    def to_problem(self, row: dict, i: int) -> Problem:
        raise NotImplementedError

    def sample(self, n: int | None = None, split: str = "train", seed: int = 0, distinct: bool = True) -> list[Problem]:
        """n problems of the split in an order fixed by the seed (repeating when n exceeds
        the split; distinct=False: drawn with replacement); n=None gives the whole split."""
        check_split(split)
        pool = self.problems[split]
        if not pool:
            raise NanoseekError(
                f"{self.name}: the {split} split of {self.path} is empty; add problems or change test_share"
            )
        if n is None:
            return list(pool)
        rng = random.Random(f"{self.name}:{split}:{seed}")
        if not distinct:
            return rng.choices(pool, k=n)
        out: list[Problem] = []
        while len(out) < n:
            out += rng.sample(pool, len(pool))
        return out[:n]


class GSM8K(FileTask):
    name = "gsm8k"
    layout = ("question", "answer")
    sample_file = "gsm8k_sample.jsonl"

    def to_problem(self, row: dict, i: int) -> Problem:
        if "####" not in row["answer"]:
            raise NanoseekError(f"{self.path}: row {i + 1}: 'answer' does not end in '#### N'")
        work, final = row["answer"].rsplit("####", 1)
        work = re.sub(r"<<[^>]*>>", "", work).strip()  # GSM8K's calculator annotations
        return Problem(
            prompt=row["question"].strip(),
            answer=final.strip().replace(",", ""),
            difficulty=len([line for line in work.splitlines() if line.strip()]),
            task=self.name,
            solution=work,
        )


class MATH(FileTask):
    name = "math"
    layout = ("problem", "solution")
    sample_file = "math_sample.jsonl"

    def to_problem(self, row: dict, i: int) -> Problem:
        answer = last_boxed(row["solution"])
        if answer is None:
            raise NanoseekError(f"{self.path}: row {i + 1}: 'solution' has no \\boxed{{}} answer")
        level = re.search(r"\d+", str(row.get("level", "")))
        return Problem(
            prompt=row["problem"].strip(),
            answer=answer.strip(),
            difficulty=int(level.group()) if level else 0,
            task=self.name,
            solution=row["solution"],
            meta={"type": row.get("type")},
        )
