"""The project's nucleus sampler against Hugging Face's temperature + top-p warpers (the referee)."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, TemperatureLogitsWarper, TopPLogitsWarper

from training.sampling import NucleusSampler, generate_kwargs, nucleus


def hf_nucleus_mask(scores, temperature, top_p):
    warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, scores.clone()))
    return torch.isfinite(warped)


def our_nucleus_mask(scores, temperature, top_p):
    logprobs = (scores / temperature).log_softmax(-1)
    sorted_logprobs, index = logprobs.sort(-1, descending=True)
    keep = nucleus(sorted_logprobs, top_p)
    return torch.zeros_like(keep).scatter_(-1, index, keep)


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95])
def test_nucleus_is_hf_top_p_after_temperature(top_p):
    generator = torch.Generator().manual_seed(0)
    # peaked, flat and mixed rows over a 500-token vocabulary
    scores = torch.randn(64, 500, generator=generator) * torch.linspace(0.1, 8.0, 64)[:, None]
    assert torch.equal(our_nucleus_mask(scores, 0.8, top_p), hf_nucleus_mask(scores, 0.8, top_p))


@pytest.mark.parametrize("candidates", [4, 1024])  # 4: the nucleus (≈ 9 tokens) overflows → full sort
def test_draws_follow_the_renormalised_nucleus(candidates):
    scores = torch.log(torch.tensor([0.30, 0.20, 0.12, 0.10, 0.08, 0.06, 0.05, 0.04, 0.03, 0.02]))
    keep = hf_nucleus_mask(scores[None], 0.8, 0.95)[0]
    probs = (scores / 0.8).softmax(-1) * keep
    probs = probs / probs.sum()
    sampler = NucleusSampler(0.8, 0.95, candidates=candidates, generator=torch.Generator().manual_seed(1))
    draws = sampler.sample(scores.expand(40_000, -1).clone())[:, 0]
    frequencies = torch.bincount(draws, minlength=len(scores)).float() / len(draws)
    assert frequencies[~keep].sum() == 0  # never outside the nucleus
    # 40k draws: the standard error of each frequency is ≤ 0.0025; 4 of them is a loose, non-flaky bound
    assert torch.allclose(frequencies, probs, atol=0.01)


def test_processor_leaves_only_the_drawn_token_and_is_seeded():
    scores = torch.randn(8, 300, generator=torch.Generator().manual_seed(2))
    first = NucleusSampler(generator=torch.Generator().manual_seed(3))(None, scores)
    again = NucleusSampler(generator=torch.Generator().manual_seed(3))(None, scores)
    assert torch.equal(first, again)
    assert torch.equal(torch.isfinite(first).sum(-1), torch.ones(8, dtype=torch.long))


def test_generate_with_a_vanishing_nucleus_is_greedy():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2)).eval()
    ids = torch.randint(0, 50, (3, 5))
    common = {
        "max_new_tokens": 8,
        "pad_token_id": 0,
        "eos_token_id": None,
        "attention_mask": torch.ones_like(ids),
    }
    greedy = model.generate(ids, **generate_kwargs(sampled=False), **common)
    tiny_p = model.generate(ids, do_sample=False, logits_processor=[NucleusSampler(top_p=1e-9)], **common)
    assert torch.equal(greedy, tiny_p)
    torch.manual_seed(5)
    sampled = model.generate(ids, **generate_kwargs(sampled=True), **common)
    torch.manual_seed(5)
    assert torch.equal(sampled, model.generate(ids, **generate_kwargs(sampled=True), **common))
