"""The project's sampler for "sampled" continuations: temperature 0.8, nucleus (top-p) 0.95, as in the
model evaluations of the field; greedy decoding shows the mode, this shows what the model says.

Why not `generate(do_sample=True, top_p=...)`: Hugging Face's top-p warper sorts the whole vocabulary at
every step and then draws with `torch.multinomial` over it. On this CPU, with a 16k vocabulary and the
300 rows of a sampled steering configuration, those two calls took 56 of 76 s of generation (cProfile of
the steering run quoted in docs/steering.md, "Cost"). Here the nucleus is found among the `candidates`
most likely tokens (a `topk`, several times cheaper than the sort) — exactly: a row whose nucleus
reaches past the candidates is re-done with a full sort — and the token is drawn by the Gumbel-max trick
(argmax of log-probability + Gumbel noise over the nucleus: an exact draw from the renormalised
nucleus). The sampler is a logits processor that leaves only the drawn token finite, so `generate`
decodes greedily and takes it; the KV cache, hooks and everything else of `generate` are unchanged. Same
distribution as HF's temperature + top-p warpers (tests/test_sampling.py); the draws themselves differ
from HF's for the same seed.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformers import LogitsProcessor, LogitsProcessorList

TEMPERATURE = 0.8
TOP_P = 0.95


def nucleus(sorted_logprobs: Float[Tensor, "row rank"], top_p: float) -> Bool[Tensor, "row rank"]:
    """Which of the tokens, sorted by descending probability, are in the nucleus: those whose more likely
    tokens hold less than `top_p` of the mass (HF's rule: the token that crosses `top_p` is kept), and
    always the most likely one."""
    probs = sorted_logprobs.exp()
    keep = (probs.cumsum(-1) - probs) < top_p
    keep[:, 0] = True
    return keep


def gumbel_argmax(
    logprobs: Float[Tensor, "row rank"], keep: Bool[Tensor, "row rank"], generator: torch.Generator | None
) -> Int[Tensor, "row 1"]:
    """One draw per row from softmax(logprobs) restricted to `keep`, by the Gumbel-max trick."""
    uniform = torch.rand(logprobs.shape, generator=generator, device=logprobs.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(torch.finfo(uniform.dtype).tiny, 1.0)))
    return (logprobs + gumbel).masked_fill(~keep, float("-inf")).argmax(-1, keepdim=True)


class NucleusSampler(LogitsProcessor):
    """Draws the next token with temperature + top-p; returns scores where only that token is finite."""

    def __init__(
        self,
        temperature: float = TEMPERATURE,
        top_p: float = TOP_P,
        candidates: int = 1024,
        generator: torch.Generator | None = None,
    ):
        if temperature <= 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature must be > 0 and top_p in (0, 1], got {temperature}, {top_p}")
        self.temperature, self.top_p, self.candidates, self.generator = (
            temperature,
            top_p,
            candidates,
            generator,
        )

    def sample(self, scores: Float[Tensor, "row vocab"]) -> Int[Tensor, "row 1"]:
        logprobs = (scores.float() / self.temperature).log_softmax(-1)
        vocab = logprobs.shape[-1]
        top_logprobs, top_index = logprobs.topk(min(self.candidates, vocab), dim=-1)  # sorted, descending
        keep = nucleus(top_logprobs, self.top_p)
        tokens = top_index.gather(-1, gumbel_argmax(top_logprobs, keep, self.generator))
        # A nucleus that keeps the last candidate may continue past it: those rows take the full sort.
        overflow = keep[:, -1].nonzero()[:, 0]
        if top_index.shape[-1] < vocab and len(overflow):
            full_logprobs, full_index = logprobs[overflow].sort(-1, descending=True)
            full_keep = nucleus(full_logprobs, self.top_p)
            tokens[overflow] = full_index.gather(-1, gumbel_argmax(full_logprobs, full_keep, self.generator))
        return tokens

    def __call__(self, input_ids: Int[Tensor, "row pos"], scores: Float[Tensor, "row vocab"]) -> Tensor:
        drawn = torch.full_like(scores, float("-inf"))
        return drawn.scatter_(-1, self.sample(scores), 0.0)


def generate_kwargs(sampled: bool) -> dict:
    """`model.generate` arguments for greedy or sampled decoding (the RNG is torch's global one: callers
    seed it with torch.manual_seed, as before)."""
    if not sampled:
        return {"do_sample": False}
    return {"do_sample": False, "logits_processor": LogitsProcessorList([NucleusSampler()])}
