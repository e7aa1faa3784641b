"""Inference: the engine (latent KV cache, continuous batching, MTP speculation), sampling,
the terminal chat and the decode benchmark."""

from nanoseek.infer.engine import (
    CompletionOutput, Engine, RequestOutput, StreamEvent, consensus, majority_vote,
)
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.speculative import SpeculativeStats

__all__ = ["CompletionOutput", "Engine", "RequestOutput", "SamplingParams", "SpeculativeStats", "StreamEvent",
           "consensus", "majority_vote"]
