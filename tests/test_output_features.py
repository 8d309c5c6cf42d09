"""Language features by output effect (analysis/output_features.py) on planted cases with known answers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from analysis.output_features import (
    language_token_weights,
    output_scores,
    rank_output_features,
    written_directions,
)
from tests.helpers import random_clt, tiny_gpt2

LANGS = ["en", "fr", "de"]
TOKENS = {"en": [10, 11, 12], "fr": [20, 21], "de": [30, 31, 32, 33]}


def hand_weights(vocab: int) -> torch.Tensor:
    weights = torch.zeros(vocab, len(LANGS))
    for k, lang in enumerate(LANGS):
        weights[TOKENS[lang], k] = 1 / len(TOKENS[lang])
    return weights


def test_a_feature_writing_a_language_direction_ranks_first(slice_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(slice_tokenizer_dir)
    model = tiny_gpt2(tokenizer, seed=1)
    with torch.no_grad():
        model.transformer.ln_f.weight.uniform_(0.5, 1.5)  # a non-trivial LayerNorm weight
    clt = random_clt(model.config.n_layer, model.config.n_embd, n_features=8)
    W_U, gamma = model.lm_head.weight.detach(), model.transformer.ln_f.weight.detach()
    # Plant: feature 5 of layer 0 writes (spread over its two target layers) the direction that, through
    # ln_f, points at the French tokens' unembeddings.
    planted = 40 * W_U[TOKENS["fr"]].mean(0) / gamma
    with torch.no_grad():
        clt.W_dec[0][5] = 0
        for target in range(2):
            clt.W_dec[0][5, target] = planted / 2 * clt.output_scale[target]
    torch.testing.assert_close(written_directions(clt)[0, 5], planted, rtol=1e-5, atol=1e-5)

    weights = hand_weights(len(tokenizer))
    scores = output_scores(model, clt, weights)
    ranked = rank_output_features(scores, LANGS, per_lang=3)
    assert (ranked["fr"][0]["layer"], ranked["fr"][0]["feature"]) == (0, 5)
    assert all((f["layer"], f["feature"]) != (0, 5) for f in ranked["en"] + ranked["de"])
    # The margin by hand: mean logit effect on the French tokens minus the mean over the other languages.
    centred = planted - planted.mean()
    effect = W_U @ (centred * gamma)
    mean = {lang: effect[TOKENS[lang]].mean() for lang in LANGS}
    expected = mean["fr"] - (mean["en"] + mean["de"]) / 2
    assert scores[0, 5, 1].item() == pytest.approx(expected.item(), rel=1e-4)


def test_language_token_weights_from_text(slice_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(slice_tokenizer_dir)
    texts = {
        "en": ["the window shows the table and the chart"] * 4,
        "fr": ["la fenêtre affiche le tableau et le diagramme"] * 4,
    }
    weights = language_token_weights(tokenizer, texts, min_share=0.8, min_count=3)
    assert torch.allclose(weights.sum(0), torch.ones(2))
    french_only = set(tokenizer(texts["fr"][0])["input_ids"]) - set(tokenizer(texts["en"][0])["input_ids"])
    assert set(weights[:, 1].nonzero().flatten().tolist()) == french_only
    with pytest.raises(ValueError, match="no token is specific"):
        language_token_weights(tokenizer, {"en": texts["en"], "en2": texts["en"]})
