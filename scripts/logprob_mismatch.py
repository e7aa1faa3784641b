"""GRPO's train/inference log-prob mismatch, float32 against bfloat16.

Three GRPO steps (4 chain prompts x 4 completions x up to 64 tokens) from a model directory (default
the demo's base model), once per dtype; prints each step's `logprob_diff_mean` and `logprob_diff_max`
from metrics.jsonl: the log-probs the engine sampled with against those of the training forward.

    python scripts/logprob_mismatch.py [MODEL_DIR]
"""

import json
import sys
import tempfile
from pathlib import Path

from nanoseek.demo import FULL
from nanoseek.train.grpo import GRPORunConfig, run


def main(model_dir: str) -> None:
    for dtype in ("float32", "bfloat16"):
        out = Path(tempfile.mkdtemp())
        cfg = GRPORunConfig(
            init_from=model_dir,
            task="chain",
            task_options=dict(FULL.task_options),
            prompts=64,
            prompts_per_step=4,
            group_size=4,
            max_new_tokens=64,
            steps=3,
            dtype=dtype,
            device="cpu",
            tensorboard=False,
            progress=False,
            loss_type="dr_grpo",
            beta=0.0,
            lr=3e-4,
        )
        run(cfg, out)
        for line in (out / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            print(f"{dtype} step {r['step']}: mean {r['logprob_diff_mean']:.3g}, max {r['logprob_diff_max']:.3g}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo/base")
