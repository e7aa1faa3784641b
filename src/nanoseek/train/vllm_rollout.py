"""`rollout.backend: vllm`: GRPO's rollouts on vLLM engines, one per GPU, as Ray actors.

The orchestration is RayRollout's (train/rollout.py): the learner publishes its weights once a
step into Ray's object store, each worker loads them, the step's prompts are split across the
workers and gathered back in prompt order, a dead worker is replaced. Only the worker differs:
`VLLMWorker` writes the policy it is given in its Hugging Face layout (DeepSeek-V3's, or a dense
student's Qwen2 / Llama) to a local directory, opens it with `vllm.LLM`, and each step loads the
learner's weights into the running engine through a worker extension (`WeightLoader`, called by
`LLM.collective_rpc`) that hands them to the model's own `load_weights`, vLLM's documented way
for RL trainers to update weights in place.

vLLM's sampler draws other random numbers than nanoseek's engine: a vLLM run is not the local
run token for token. The log-probs it returns are the model's before temperature (vLLM's default
raw log-probs), as nanoseek's engine gives them, so the mismatch metric and the async importance
ratio read the same quantity. Weights travel as pickled CPU tensors (fine for the models this
project trains; a real-size policy would sync over NCCL instead). Needs CUDA and `pip install vllm`.
"""

from __future__ import annotations

import tempfile
import time

import torch

from nanoseek.errors import NanoseekError
from nanoseek.train.rollout import RayRollout, RolloutConfig


class WeightLoader:
    """vLLM worker extension (`LLM(worker_extension_cls=...)`): methods run on each vLLM worker."""

    def nanoseek_load_weights(self, weights: dict) -> int:
        device = next(self.model_runner.model.parameters()).device
        self.model_runner.model.load_weights(weights=((k, v.to(device)) for k, v in weights.items()))
        return len(weights)


def hub_weights(model) -> dict:
    """The model's weights under their Hugging Face names, as vLLM's loaders read them."""
    from nanoseek.dense import DenseTransformer
    from nanoseek.io.hf import hub_state_dict

    if isinstance(model, DenseTransformer):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return hub_state_dict(model)


class VLLMWorker:
    """One Ray actor with one GPU: a vLLM engine on the policy, with RolloutWorker's methods."""

    def __init__(self, model, tokenizer, engine_kwargs: dict, threads: int):
        try:
            import vllm
        except ImportError:
            raise NanoseekError("rollout.backend vllm needs vLLM: pip install vllm (CUDA GPUs only)") from None
        from nanoseek.io.hf import save_pretrained

        torch.set_num_threads(threads)
        self.vllm, self.model, self.tokenizer = vllm, model.eval().requires_grad_(False), tokenizer
        self.directory = tempfile.mkdtemp(prefix="nanoseek-vllm-")
        save_pretrained(self.model, self.directory)
        tokenizer.save_pretrained(self.directory)
        self.llm = vllm.LLM(
            model=self.directory,
            max_model_len=engine_kwargs["max_seq_len"],
            max_num_seqs=engine_kwargs["max_batch_size"],
            dtype="auto",
            enforce_eager=True,
            worker_extension_cls=f"{__name__}.WeightLoader",
        )
        self.version = -1

    def pid(self) -> int:
        import os

        return os.getpid()

    def load(self, weights: dict, version: int) -> int:
        self.model.load_state_dict(weights)
        self.llm.collective_rpc("nanoseek_load_weights", args=(hub_weights(self.model),))
        self.version = version
        return version

    def generate(self, prompt_ids: list[list[int]], params) -> tuple[list[list], int, float, int]:
        from nanoseek.data.reasoning import split_reasoning
        from nanoseek.infer.engine import CompletionOutput

        sampling = self.vllm.SamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            min_tokens=params.min_tokens,
            stop=list(params.stop or []) or None,
            seed=params.seed,
            logprobs=0 if params.logprobs is not None else None,
        )
        t0 = time.perf_counter()
        results = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], sampling, use_tqdm=False)
        groups = []
        for r in results:
            group = []
            for o in sorted(r.outputs, key=lambda o: o.index):
                split = split_reasoning(o.text)
                logprobs = None
                if o.logprobs is not None:
                    logprobs = [step[t].logprob for t, step in zip(o.token_ids, o.logprobs)]
                group.append(
                    CompletionOutput(
                        index=o.index,
                        text=o.text,
                        token_ids=list(o.token_ids),
                        finish_reason=o.finish_reason,
                        stop_reason=o.stop_reason,
                        reasoning=split.reasoning,
                        answer=split.answer,
                        # vLLM gives no per-token text offsets here: the reasoning re-encoded
                        reasoning_tokens=len(self.tokenizer.encode(split.reasoning)) if split.reasoning else 0,
                        logprobs=logprobs,
                    )
                )
            groups.append(group)
        tokens = sum(len(o.token_ids) for g in groups for o in g)
        return groups, self.version, time.perf_counter() - t0, tokens


class VLLMRollout(RayRollout):
    def __init__(self, model, tokenizer, engine_kwargs: dict, config: RolloutConfig):
        if not torch.cuda.is_available():
            raise NanoseekError("rollout.backend vllm needs CUDA GPUs; torch sees none (use backend ray on CPUs)")
        super().__init__(
            model, tokenizer, engine_kwargs, config, worker=VLLMWorker, resources={"num_gpus": 1, "num_cpus": 1}
        )
