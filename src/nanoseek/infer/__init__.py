"""Inference: the engine (latent KV cache, continuous batching, MTP speculation), sampling and
the terminal chat. Majority vote (cons@k) is with the evaluation, in nanoseek.eval."""

from nanoseek.infer.engine import CompletionOutput, Engine, RequestOutput, StreamEvent
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.speculative import SpeculativeStats

__all__ = ["CompletionOutput", "Engine", "RequestOutput", "SamplingParams", "SpeculativeStats", "StreamEvent"]
