"""Models side by side on the same held-out text (training.model_eval) and prompt batching by length."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from tests.helpers import tiny_gpt2
from training import evaluate
from training.corpus.build import load_corpus
from training.errors import UserError
from training.model_eval import ModelEvalConfig, cut_prompt, run_model_eval
from training.models import load_model


def test_cut_prompt_at_a_word_boundary():
    text = "The quick brown fox jumps over the lazy dog and keeps running far away"
    assert cut_prompt(text, "en", 30) == "The quick brown fox jumps"
    assert cut_prompt("short text", "en", 30) == "short text"
    assert cut_prompt("单击保存按钮以写入文件。" * 4, "zh", 64) == ("单击保存按钮以写入文件。" * 2)[:24]


def test_next_token_kl_matches_the_definition_and_is_never_negative():
    g = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(3, 5, 40, generator=g), torch.randn(3, 5, 40, generator=g)
    p, q = p_logits.double().softmax(-1), q_logits.double().softmax(-1)
    reference = (p * (p / q).log()).sum(-1)
    for chunk in (1, 4, 512):  # chunking over positions changes nothing
        kl = evaluate.next_token_kl(p_logits, q_logits, rows_per_chunk=chunk)
        assert kl.shape == (3, 5) and kl.dtype == torch.float32
        torch.testing.assert_close(kl.double(), reference, rtol=1e-6, atol=1e-7)
    # A distribution against itself is exactly 0, and a copy rounded to fp16 is ≥ 0 and agrees with the
    # float64 definition (CI once measured −5e-9 with the float32 sum).
    assert evaluate.next_token_kl(p_logits, p_logits).abs().max() == 0
    big = torch.randn(64, 4096, generator=g) * 4
    rounded = big.half().float()
    kl = evaluate.next_token_kl(big, rounded)
    lp, lq = big.double().log_softmax(-1), rounded.double().log_softmax(-1)
    torch.testing.assert_close(
        kl.double(), (lp.exp() * (lp - lq)).sum(-1).clamp_min(0), rtol=1e-4, atol=1e-12
    )
    assert (kl >= 0).all()
    with pytest.raises(ValueError, match="logit shapes differ"):
        evaluate.next_token_kl(p_logits, q_logits[:, :4])


def test_prompts_of_mixed_lengths_batch_like_single_prompts(slice_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(slice_tokenizer_dir)
    model = tiny_gpt2(tokenizer, seed=3)
    texts = ["Open the file", "Select the cell range and then", "Open a", "Save the document now please"]
    device = torch.device("cpu")
    _, together, ids = evaluate.generate_continuations(model, tokenizer, texts, None, 6, True, device)
    for text, continuation, row in zip(texts, together, ids):
        _, alone, _ = evaluate.generate_continuations(model, tokenizer, [text], None, 6, True, device)
        assert alone == [continuation] and len(row) == 6
    # Left-padded batches of mixed lengths (positions counted from each prompt's first token) continue
    # every prompt exactly as it continues alone; prompts come back unpadded, in the callers' order.
    prompts, padded, padded_ids = evaluate.generate_continuations(
        model, tokenizer, texts, None, 6, True, device, batch_size=3, pad=True
    )
    assert padded == together and padded_ids == ids
    assert prompts == evaluate.generate_continuations(model, tokenizer, texts, None, 6, True, device)[0]
    with pytest.raises(UserError, match="exceed the model.s context of 32"):
        evaluate.generate_continuations(model, tokenizer, texts, None, 30, True, device)


def test_models_side_by_side(tmp_path, tiny_model_dir, slice_tokenizer_dir, real_slice_corpus_dir):
    other = tmp_path / "other" / "model"
    tokenizer = AutoTokenizer.from_pretrained(slice_tokenizer_dir)
    tiny_gpt2(tokenizer, seed=7).save_pretrained(other)
    tokenizer.save_pretrained(other)
    config = ModelEvalConfig(
        model_dirs=[str(tiny_model_dir), str(other)],
        names=["a", "b"],
        corpus_dir=str(real_slice_corpus_dir),
        run_dir=str(tmp_path / "eval"),
        prompts_per_lang=4,
        prompt_chars=30,
        new_tokens=4,
        nats_paragraphs=20,
        device="cpu",
    )
    results = run_model_eval(config)
    assert [m["name"] for m in results["models"]] == ["a", "b"] and results["langs"] == ["de", "en", "fr"]
    assert len(results["prompts"]) == 12 and all(len(p) <= 30 for p in results["prompts"])
    # nats/char is the library's own measure on the first validation paragraphs of each language.
    corpus = load_corpus(real_slice_corpus_dir)
    model, tok = load_model(other)
    french = [t for t, l in zip(corpus["validation"]["text"], corpus["validation"]["lang"]) if l == "fr"][:20]
    expected = evaluate.nats_per_char(model, tok, french, model.config.n_positions, torch.device("cpu"))
    assert results["models"][1]["nats_per_char"]["fr"] == pytest.approx(expected, rel=1e-6)
    for record in results["models"]:
        for mode in ("greedy", "sampled"):
            assert len(record["continuations"][mode]) == 12
            assert all(0 < record[mode][lang]["distinct_share"] <= 1 for lang in results["langs"])
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| fr | " in report and "Distinct-token share, sampled" in report
    # Resumed: nothing recomputed, same answer.
    assert json.dumps(run_model_eval(config)) == json.dumps(results)
