"""SamplingParams (the fields of vLLM's, plus a thinking budget) and the token choice.

Each completion draws from its own seeded `torch.Generator`, so a seeded request gives the
same tokens whatever else shares its batch. The generators live on the CPU whatever the
model's device: a draw is one uniform per token, moved to the logits' device and turned
into a token by inverse CDF there, so a seed gives the same uniforms on the CPU and on a
GPU (the tokens then differ only where the devices' logits do), and a CUDA generator per
completion (state on the GPU, one per stream) is not needed for one number per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoseek.errors import NanoseekError


@dataclass
class SamplingParams:
    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus: the smallest set of tokens holding this much probability
    top_k: int = 0  # 0 (or -1): every token
    max_tokens: int | None = 16  # None: up to the engine's max_seq_len; 0: none, only the prompt is scored
    min_tokens: int = 0  # end-of-sequence and stop tokens are banned, stop strings ignored, until then
    stop: list[str] | str | None = None  # strings that end a completion (left out of its text)
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    max_thinking_tokens: int | None = None  # reasoning budget: then "</think>" is forced and the answer follows
    # None: no log-probs; N >= 0: each generated token's log-probability under the model (the
    # softmax of its logits, before temperature, top-k, top-p and bans), and the N likeliest.
    logprobs: int | None = None
    # None: none; N >= 0: each prompt token's log-probability given the tokens before it, from the
    # prefill's forward pass (RequestOutput.prompt_logprobs), and the N likeliest at its position.
    prompt_logprobs: int | None = None
    # A grammar the completion must follow (llguidance's Lark syntax, nanoseek.infer.grammar):
    # tokens outside it are masked before the choice; None: unconstrained.
    grammar: str | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0

        def bad(name, expected):
            raise NanoseekError(f"SamplingParams.{name} = {getattr(self, name)!r}: expected {expected}")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "an integer >= 1")
        if not self.temperature >= 0:
            bad("temperature", "a number >= 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "an integer >= 0 (0 or -1: off)")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 0):
            bad("max_tokens", "an integer >= 0 or None")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"at most max_tokens ({self.max_tokens})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "non-empty strings")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "an integer or None")
        if self.max_thinking_tokens is not None and (
            not isinstance(self.max_thinking_tokens, int) or self.max_thinking_tokens < 0
        ):
            bad("max_thinking_tokens", "an integer >= 0 or None")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            bad("grammar", "a non-empty grammar string or None")
        if self.grammar is not None and self.min_tokens:
            bad("min_tokens", "0 with a grammar (the grammar decides where the completion may end)")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                bad(name, "an integer >= 0 or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None, index: int) -> torch.Generator:
    """The generator of completion `index` of a request: seeded from (seed, index), or fresh."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(hash((seed, index)) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def filter_logits(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """logits [B, V] scaled by temperature [B], with tokens outside each row's top-k and then
    its top-p nucleus set to -inf (top_k [B]: 0 keeps all; top_p [B]: 1 keeps all)."""
    logits = logits.float() / temperature[:, None]
    use_k, use_p = top_k > 0, top_p < 1
    if not (use_k.any() or use_p.any()):
        return logits
    ordered, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    remove = use_k[:, None] & (ranks >= top_k[:, None])
    ordered = ordered.masked_fill(remove, float("-inf"))
    if use_p.any():
        probs = ordered.softmax(dim=-1)
        # Drop a token once the more likely ones already hold top_p; the first always stays (also
        # where top_p is below float32's smallest number and rounds to 0).
        remove = remove | (((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (ranks > 0))
        ordered = ordered.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, ordered)


def choose_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """One token per row of logits [B, V]: argmax for greedy rows, else a draw from the
    filtered distribution with that row's generator. A row with no finite best logit (NaN,
    +inf, or -inf everywhere) has no token to give: a NanoseekError that names the cause."""
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if len(rows) < len(params):
        best = logits.argmax(dim=-1)  # a NaN counts as the largest: the check below sees it
        best = torch.where(logits.gather(-1, best[:, None])[:, 0].isfinite(), best, -1)
        tokens = best.tolist()
    else:
        tokens = [0] * len(params)
    if rows:
        sub = [params[i] for i in rows]
        dev = logits.device
        filtered = filter_logits(
            logits if len(rows) == len(params) else logits[torch.tensor(rows, device=dev)],
            torch.tensor([p.temperature for p in sub], dtype=torch.float32, device=dev),
            torch.tensor([p.top_k for p in sub], device=dev),
            torch.tensor([p.top_p for p in sub], dtype=torch.float32, device=dev),
        )
        # One uniform per row from its own generator, then every row at once by inverse CDF:
        # a row's token depends only on its logits and its generator, not on the batch.
        u = torch.cat([torch.rand(1, generator=generators[i], dtype=torch.float32) for i in rows]).to(dev)
        cdf = filtered.softmax(dim=-1).cumsum(dim=-1)
        total = cdf[:, -1:].contiguous()
        chosen = torch.searchsorted(cdf, u[:, None] * total, right=True)
        # u * total may round up to total: then the last token with any probability (cdf reaches total there)
        chosen = torch.minimum(chosen, torch.searchsorted(cdf, total))[:, 0]
        # NaN or +inf anywhere, or nothing left, make the softmax NaN: no token (the same sync as before)
        chosen = torch.where(total[:, 0].isfinite() & (total[:, 0] > 0), chosen, -1)
        for i, token in zip(rows, chosen.tolist()):
            tokens[i] = token
    if -1 in tokens:
        raise _no_token_error(logits, params, [i for i, t in enumerate(tokens) if t == -1])
    return tokens


def _no_token_error(logits: torch.Tensor, params: list[SamplingParams], bad: list[int]) -> NanoseekError:
    """Why rows `bad` of logits give no token: the model's numbers, or a temperature that overflows them."""
    row = logits[bad[0]].float()
    rows = f"batch row{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''}"
    if row.isnan().any() or row.isposinf().any() or row.isneginf().all():
        cause = "NaN" if row.isnan().any() else "+inf" if row.isposinf().any() else "-inf for every token"
        return NanoseekError(
            f"sampling: the model's logits are {cause} ({rows}); its weights are likely not finite "
            "(a diverged training run?), so no token can be chosen"
        )
    t = params[bad[0]].temperature
    return NanoseekError(
        f"sampling: temperature {t:g} is too small: the logits divided by it overflow ({rows}); use 0 for greedy"
    )
