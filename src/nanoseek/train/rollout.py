"""Where GRPO's completions are sampled: in the learner's process, or on Ray rollout workers.

Generation dominates an RL step, so systems that outgrow one machine split the two jobs (as
verl and OpenRLHF do on Ray): rollout workers hold inference engines and sample, a learner
trains, and each step the new weights flow from the learner to the workers.

- `local` (the default): the learner's own Engine, which reads the policy's weights in place.
- `ray`: `workers` Ray actors (`RolloutWorker`), each holding a nanoseek Engine on its own copy
  of the policy. Each step the learner publishes its weights once into Ray's object store
  (`publish`: one `ray.put`, every worker loads from the same object), the step's prompts are
  split into contiguous shares, one per worker, and the completions come back in prompt order.
  A seeded request draws the same tokens whatever else shares its batch (infer/sampling.py), so
  with the same seed the workers sample what the single process samples and the run's rewards
  and weights are the same. A worker that dies is replaced (a new actor, loaded with the same
  published weights) and its share of the prompts is sampled again: no step is lost or repeated.
- `vllm`: the same split on vLLM engines for GPU clusters (`VLLMRollout`).

With `rollout.async` the workers sample step t+1 while the learner trains on step t (one step
off-policy): the trainer submits the next rollout before its update, and the loss's importance
ratio is taken against the log-probs the workers sampled with (train/grpo.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import ConfigDict, Field

from nanoseek.errors import NanoseekError
from nanoseek.train.config import ConfigKeyError, Section

BACKENDS = ("local", "ray", "vllm")


class RolloutConfig(Section):
    """The `rollout` section of a GRPO config."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True, serialize_by_alias=True)

    workers: int = Field(1, ge=1)  # rollout workers (engines) sampling each step's prompts
    backend: Literal[BACKENDS] = "local"
    # ray: None starts a local Ray cluster in this process; "auto" joins the running one (`ray start
    # --head` on this machine); "ray://host:10001" or "host:6379" joins a remote one
    ray_address: str | None = None
    async_: bool = Field(False, alias="async")  # sample step t+1 while training on step t
    threads: int = Field(1, ge=1)  # torch threads (and Ray CPUs) of each worker
    max_restarts: int = Field(3, ge=0)  # dead workers replaced in one step before the run stops

    def check(self) -> None:
        if self.backend == "local" and self.workers > 1:
            raise ConfigKeyError("workers", f"{self.workers} workers need backend ray or vllm (local is one engine)")
        if self.backend == "local" and self.async_:
            raise ConfigKeyError(
                "async", "needs backend ray or vllm: the local engine reads the learner's weights in place"
            )
        if self.ray_address is not None and self.backend != "ray":
            raise ConfigKeyError("ray_address", f"is for backend ray, not {self.backend}")


@dataclass
class Rollouts:
    """A step's completions, `completions[i]` the group of prompt i, and how they were made."""

    completions: list[list]
    version: int  # the learner's step count whose weights sampled them
    workers: list[dict] = field(default_factory=list)  # per worker: tokens, seconds
    restarts: int = 0
    seconds: float = 0.0


def split(n: int, parts: int) -> list[slice]:
    """`n` items in `parts` contiguous shares whose sizes differ by at most one (empty shares left out)."""
    size, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + size + (i < extra)
        if stop > start:
            out.append(slice(start, stop))
        start = stop
    return out


def worker_metrics(rollouts: Rollouts, wall: float) -> dict:
    """Per worker: rollout tokens/s while it generated, and its busy share of the step's wall time."""
    out = {"rollout_seconds": rollouts.seconds, "rollout_restarts": rollouts.restarts}
    for i, w in enumerate(rollouts.workers):
        out[f"rollout/worker{i}_tokens_per_s"] = w["tokens"] / max(w["seconds"], 1e-9)
        out[f"rollout/worker{i}_busy"] = min(w["seconds"] / max(wall, 1e-9), 1.0)
    return out


# ---------------------------------------------------------------------------------------
# local: the learner's engine.
# ---------------------------------------------------------------------------------------
class LocalRollout:
    def __init__(self, engine):
        self.engine = engine

    def publish(self, model, version: int) -> None:
        """Nothing to send: the engine reads the policy's weights in place."""

    def submit(self, prompt_ids: list[list[int]], params, version: int):
        t0 = time.perf_counter()
        results = self.engine.generate(prompt_ids, params)
        seconds = time.perf_counter() - t0
        completions = [list(r.outputs) for r in results]
        tokens = sum(len(o.token_ids) for g in completions for o in g)
        done = Rollouts(completions, version, [{"tokens": tokens, "seconds": seconds}], seconds=seconds)
        return lambda: done

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------
# ray: engine actors, weights through the object store.
# ---------------------------------------------------------------------------------------
class RolloutWorker:
    """One Ray actor: an Engine on its own copy of the policy (made as a Ray actor by RayRollout)."""

    def __init__(self, model, tokenizer, engine_kwargs: dict, threads: int):
        torch.set_num_threads(threads)
        from nanoseek.infer import Engine

        self.model = model.eval().requires_grad_(False)
        self.engine = Engine(self.model, tokenizer, **engine_kwargs)
        self.version = -1

    def pid(self) -> int:
        return os.getpid()

    def load(self, weights: dict, version: int) -> int:
        self.model.load_state_dict(weights)  # copies in place: the engine's folded weights refold
        self.version = version
        return version

    def generate(self, prompt_ids: list[list[int]], params) -> tuple[list[list], int, float, int]:
        t0 = time.perf_counter()
        results = self.engine.generate(prompt_ids, params)
        completions = [list(r.outputs) for r in results]
        tokens = sum(len(o.token_ids) for g in completions for o in g)
        return completions, self.version, time.perf_counter() - t0, tokens


def _ray():
    try:
        import ray
    except ImportError:
        raise NanoseekError(
            "rollout.backend ray needs Ray: pip install 'nanoseek[scale]' (or pip install ray)"
        ) from None
    return ray


def _cpu_weights(model) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class RayRollout:
    """`workers` RolloutWorker actors on a Ray cluster (started here, or joined at `ray_address`)."""

    def __init__(self, model, tokenizer, engine_kwargs: dict, config: RolloutConfig, worker=None, resources=None):
        ray = self.ray = _ray()
        self.config = config
        self.started_ray = False
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
            if config.ray_address is None:  # a new local cluster of just the CPUs the workers take
                kwargs["num_cpus"] = config.workers * config.threads
            try:
                ray.init(address=config.ray_address or "local", **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = config.ray_address or "a local cluster"
                raise NanoseekError(f"rollout.ray_address: could not start Ray at {where} ({e})") from None
            self.started_ray = True
        # what a replacement worker is built from: the model's structure once, in the object store
        cpu_model = _copy_to_cpu(model)
        self.blob = ray.put((cpu_model, tokenizer, engine_kwargs, config.threads))
        resources = resources or {"num_cpus": config.threads}
        self.actor_class = ray.remote(max_restarts=0, **resources)(worker or RolloutWorker)
        self.weights = None  # (object ref, version) of the last publish
        self.workers = [self._new_worker() for _ in range(config.workers)]
        self.worker_pids()  # up before the first step (and an engine that cannot be made fails here)
        self.restarts = 0

    def _new_worker(self):
        model, tokenizer, engine_kwargs, threads = self.ray.get(self.blob)
        worker = self.actor_class.remote(model, tokenizer, engine_kwargs, threads)
        if self.weights is not None:
            worker.load.remote(self.weights[0], self.weights[1])
        return worker

    def publish(self, model, version: int) -> None:
        """The learner's weights into the object store once; every worker loads that one object."""
        ref = self.ray.put(_cpu_weights(model))
        self.weights = (ref, version)
        for w in self.workers:
            w.load.remote(ref, version)

    def worker_pids(self) -> list[int]:
        return self.ray.get([w.pid.remote() for w in self.workers])

    def submit(self, prompt_ids: list[list[int]], params, version: int):
        """Start sampling; returns a function that waits for the Rollouts (in prompt order)."""
        t0 = time.perf_counter()
        shares = split(len(prompt_ids), len(self.workers))
        pending = {i: self.workers[i].generate.remote(prompt_ids[s], params) for i, s in enumerate(shares)}

        def result() -> Rollouts:
            parts: dict[int, tuple] = {}
            restarts = 0
            while pending:
                i, ref = next(iter(pending.items()))
                try:
                    parts[i] = self.ray.get(ref)
                    del pending[i]
                except self.ray.exceptions.RayActorError as e:
                    restarts += 1
                    if restarts > self.config.max_restarts:
                        raise NanoseekError(
                            f"rollout: {restarts} workers died in one step (rollout.max_restarts "
                            f"{self.config.max_restarts}); last: {str(e).splitlines()[0]}"
                        ) from None
                    self.workers[i] = self._new_worker()  # loaded with the published weights first
                    pending[i] = self.workers[i].generate.remote(prompt_ids[shares[i]], params)
            self.restarts += restarts
            completions = [g for i in range(len(shares)) for g in parts[i][0]]
            versions = {parts[i][1] for i in parts}
            if versions != {version}:
                raise NanoseekError(f"rollout: workers sampled with weights {sorted(versions)}, expected {version}")
            workers = [{"tokens": parts[i][3], "seconds": parts[i][2]} for i in range(len(shares))]
            return Rollouts(completions, version, workers, restarts, time.perf_counter() - t0)

        return result

    def close(self) -> None:
        for w in self.workers:
            self.ray.kill(w)
        self.workers = []
        if self.started_ray:
            self.ray.shutdown()


def _copy_to_cpu(model):
    import copy

    device = next(model.parameters()).device
    if device.type == "cpu":
        return copy.deepcopy(model)
    return copy.deepcopy(model).to("cpu")


def make_rollout(config: RolloutConfig, model, tokenizer, engine_kwargs: dict, engine=None):
    """The rollout of `config.backend`; `engine`: the learner's own (local)."""
    if config.backend == "local":
        from nanoseek.infer import Engine

        return LocalRollout(engine or Engine(model, tokenizer, **engine_kwargs))
    if config.backend == "ray":
        return RayRollout(model, tokenizer, engine_kwargs, config)
    from nanoseek.train.vllm_rollout import VLLMRollout

    return VLLMRollout(model, tokenizer, engine_kwargs, config)
