"""LinguaMap's protocol (analysis/linguamap.py) on hand-made pages, outputs and prompts."""

from __future__ import annotations

import pytest
import torch

from analysis import linguamap as lm
from training.corpus.libreoffice import parse_help_page_marks

EN = """<div id="DisplayArea">
<p id="par_id1">To change the height, choose <span class="menuitem">Format - Row - Height</span> and enter
<span class="emph">Row height</span>.</p>
<p id="par_id2">Click <span class="emph">OK</span> to close the dialog window now.</p>
</div>"""
FR = """<div id="DisplayArea">
<p id="par_id1">Pour changer la hauteur, choisissez <span class="menuitem">Format - Ligne - Hauteur</span> et
saisissez <span class="emph">Hauteur de ligne</span>.</p>
<p id="par_id2">Cliquez sur OK pour fermer la boîte de dialogue maintenant.</p>
</div>"""


def hand_items() -> list[lm.ClozeItem]:
    en, fr = parse_help_page_marks(EN), parse_help_page_marks(FR)
    items = []
    for paragraph in ("par_id1", "par_id2"):
        items += lm.align_marks(
            {"en": en[paragraph], "fr": fr[paragraph]}, f"lo:p.html#{paragraph}", "p.html"
        )
    return items


def test_marked_terms_align_across_languages_and_mismatches_are_dropped():
    items = hand_items()
    # par_id2: English marks "OK", French marks nothing → dropped, not guessed
    assert [item.item_id for item in items] == ["lo:p.html#par_id1@0", "lo:p.html#par_id1@1"]
    first, second = items
    assert first.term == {"en": "Format - Row - Height", "fr": "Format - Ligne - Hauteur"}
    assert first.prefix == {
        "en": "To change the height, choose ",
        "fr": "Pour changer la hauteur, choisissez ",
    }
    assert second.term == {"en": "Row height", "fr": "Hauteur de ligne"}
    assert second.prefix["fr"].endswith("Hauteur et saisissez ")
    # a paragraph whose languages mark different classes is dropped too
    swapped = {
        "en": ("a b c d e f g h i j k l m n", [(14, 15, "emph")]),
        "fr": ("a b c d e f g h i j k l m n", [(14, 15, "menuitem")]),
    }
    assert lm.align_marks(swapped, "x", "p") == []
    # marks in another order in one language (its k-th term is English's j-th): dropped
    text = "Use the commands alpha and beta in this formula"
    en = (text, [(17, 22, "emph"), (27, 31, "emph")])
    permuted = {"en": en, "zh": (text, [(27, 31, "emph"), (17, 22, "emph")])}
    assert lm.align_marks(permuted, "x", "p") == []
    assert len(lm.align_marks({"en": en, "de": en}, "x", "p")) == 2
    with_distractors = lm.with_distractors(
        items, {"p.html": {"en": ["Row height", "OK", "Cancel"], "fr": []}}
    )
    assert with_distractors[0].distractors["en"] == ["Cancel", "OK", "Row height"]
    assert with_distractors[1].distractors["en"] == ["Cancel", "OK"]


def test_each_outcome_category_on_hand_made_outputs():
    item = lm.ClozeItem(
        "x@0",
        "p",
        {"en": "choose ", "fr": "choisissez ", "de": "wählen Sie "},
        {"en": "Row height", "fr": "Hauteur de ligne", "de": "Zeilenhöhe"},
    )
    assert lm.classify(" Hauteur de ligne puis cliquez", item, "fr") == "correct"
    assert lm.classify("hauteur DE LIGNE", item, "fr") == "correct"  # case-insensitive
    assert lm.classify(" Row height and click OK", item, "fr") == "other_language"
    assert lm.classify(" Zeilenhöhe", item, "fr") == "other_language"
    wrong = " la largeur de la colonne dans la boîte de dialogue qui s'ouvre alors à l'écran"
    assert lm.classify(wrong, item, "fr") == "wrong_expected_language"
    assert lm.classify(" 1234 ###", item, "fr") == "other"
    # what the judge calls the "other" answers, as shares of all answers (the correct one is not counted)
    english = " and then the dialog closes when you click on the button at the bottom of the window"
    answers = [" Hauteur de ligne", english, english, " 1234 ###"]
    verdicts = lm.other_verdicts(answers, [lm.classify(a, item, "fr") for a in answers])
    assert verdicts == {"en": 0.5, "unknown": 0.25} and list(verdicts) == ["en", "unknown"]
    assert lm.likelihood_outcome([-1.0, -2.0, -3.0, -4.0, -5.0]) == "correct"
    assert lm.likelihood_outcome([-2.0, -1.0, -3.0, -4.0, -5.0]) == "other_language"
    assert lm.likelihood_outcome([-2.0, -3.0, -3.0, -1.0, -5.0]) == "wrong_expected_language"
    assert lm.shares(["correct", "other", "correct", "other_language"]) == {
        "correct": 0.5,
        "other_language": 0.25,
        "wrong_expected_language": 0.0,
        "other": 0.25,
        "n": 4,
    }


def test_scenario_prompts_are_built_exactly():
    from analysis.linguamap_run import scenario_prompts

    items = [
        lm.ClozeItem(
            f"p{i}#a@0",
            f"page{i}",
            {"en": f"en prefix {i} ", "fr": f"fr préfixe {i} "},
            {"en": f"Term{i}", "fr": f"Terme{i}"},
        )
        for i in range(4)
    ]
    assert [lm.scenario_languages(s, "fr") for s in lm.SCENARIOS] == [
        ("en", "en", "en"),
        ("fr", "fr", "fr"),
        ("en", "fr", "fr"),
        ("fr", "en", "fr"),
    ]
    assert lm.build_prompt([("a ", "X"), ("b ", "Y")], "query ") == "a X\nb Y\nquery"
    prompts = scenario_prompts(items, "4", "fr", shots=2, seed=0)
    item, prompt, expected, query_lang = prompts[0]
    lines = prompt.split("\n")
    assert expected == "fr" and query_lang == "en" and lines[-1] == "en prefix 0"
    assert len(lines) == 3 and all(line.startswith("fr préfixe ") and "Terme" in line for line in lines[:2])
    assert "Terme0" not in prompt  # demonstrations come from other pages
    assert scenario_prompts(items, "4", "fr", shots=2, seed=0) == prompts  # seeded
    untranslated = lm.ClozeItem(
        "u#a@0", "pageU", {"en": "click ", "fr": "cliquez sur "}, {"en": "OK", "fr": "OK"}
    )
    assert not lm.tells_apart(untranslated, "fr") and lm.tells_apart(untranslated, "en")
    assert [p[0].item_id for p in scenario_prompts([*items, untranslated], "2", "fr", 0, 0)] == [
        i.item_id for i in items
    ]
    zero = scenario_prompts(items, "3", "fr", shots=0, seed=0)
    assert zero[1][1] == "fr préfixe 1" and zero[1][2] == "fr"
    assert (
        lm.answer_text("choose ", "Row height") == " Row height" and lm.answer_text("选择", "行高") == "行高"
    )
    assert lm.contrast_language("fr", "en") == "en" and lm.contrast_language("fr", "fr") == "en"
    assert lm.contrast_language("en", "en") == "fr"
    # prefixes are cut to their last characters, at a word, keeping the space before the term
    assert lm.truncate_prefix("To change the row height, choose ", 20) == "row height, choose "
    assert lm.truncate_prefix("To change the row height, choose ", 17) == "height, choose "
    assert (
        lm.truncate_prefix("short ", 20) == "short "
        and lm.truncate_prefix("要更改行高请选择", 4) == "高请选择"
    )


@torch.no_grad()
def test_likelihood_ranking_is_the_mean_token_log_probability(slice_tokenizer_dir):
    from transformers import AutoTokenizer

    from tests.helpers import tiny_gpt2

    tokenizer = AutoTokenizer.from_pretrained(slice_tokenizer_dir)
    model = tiny_gpt2(tokenizer, seed=5).eval()
    prompt, candidates = "Choisissez", [" Format - Cellules", " Tools", " Hauteur de ligne"]
    scores = lm.candidate_scores(model, tokenizer, prompt, candidates)
    prompt_ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for candidate, score in zip(candidates, scores):
        ids = tokenizer(candidate, add_special_tokens=False)["input_ids"]
        total = 0.0
        for i, token in enumerate(ids):  # one token at a time, by hand
            logits = model(input_ids=torch.tensor([prompt_ids + ids[:i]])).logits[0, -1]
            total += float(torch.log_softmax(logits, -1)[token])
        assert score == pytest.approx(total / len(ids), rel=1e-4, abs=1e-5)


def test_finetuning_data_leaves_held_out_pages_out_and_the_scenario_runs(
    real_slice_corpus_dir, tiny_model_dir, tmp_path
):
    """Training items come only from pages without held-out paragraphs; the linguamap fine-tuning scenario
    trains on the protocol's texts and reports the protocol before and after."""
    import dataclasses
    import json

    from analysis.linguamap_run import help_roots
    from training.corpus.build import load_corpus
    from training.finetune import FinetuneConfig, finetune

    langs = ["en", "fr", "de"]
    corpus = load_corpus(real_slice_corpus_dir)
    roots = help_roots(langs)
    held_out, counts = lm.held_out_items(corpus, langs, roots)
    assert counts["paragraphs"] > 0 and counts["items"] == len(held_out)
    for item in held_out:  # each item is the corpus paragraph cut at a marked term
        assert all(item.prefix[l] and item.term[l] for l in langs)
    held_out_pages = {
        lm.page_and_paragraph(p)[0] for p in corpus["parallel"]["parallel_id"] if lm.page_and_paragraph(p)
    }
    train = lm.training_items(roots, langs, held_out_pages, subdirs=["shared/optionen"])
    assert train and not {item.page for item in train} & held_out_pages
    texts = lm.finetune_texts(train[:20], langs, shots=1, seed=0)
    assert len(texts) == 20 * 2 * 3 and {t["lang"] for t in texts} == {"fr", "de"}
    validation, test = lm.split_by_page(train[20:60])
    assert validation and test and not {i.page for i in validation} & {i.page for i in test}

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts))
    for name, rows in (("validation", validation), ("test", test)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(i.to_json()) + "\n" for i in rows))
    config = dataclasses.replace(
        FinetuneConfig(),
        model_dir=str(tiny_model_dir),
        corpus_dir=str(real_slice_corpus_dir),
        run_dir=str(tmp_path / "ft"),
        scenario="linguamap",
        strategy="full",
        mixture="fr=0.5,de=0.5",
        target_langs=["fr", "de"],
        linguamap_data=str(data),
        linguamap_items=4,
        token_budget=2000,
        max_steps=2,
        micro_batch=2,
        warmup_steps=1,
        eval_every=2,
        ckpt_every=2,
        eval_blocks=2,
        gen_prompts=2,
        gen_new_tokens=3,
        device="cpu",
    )
    summary = finetune(config)
    assert summary["metric"] == "linguamap"
    for key in ("target_before", "target_after", "validation_before", "validation_after"):
        assert 0.0 <= summary[key] <= 1.0
    assert set(summary["linguamap_after"]) == {"generation", "likelihood", "consistency"}
    with pytest.raises(Exception, match="linguamap-data"):
        finetune(
            dataclasses.replace(config, linguamap_data=str(tmp_path / "none"), run_dir=str(tmp_path / "x"))
        )


def test_scenario_means_weigh_each_language_equally_and_count_english_drift():
    from analysis.linguamap_run import scenario_means

    def cell(lang, n, correct, wrong, detected):
        other = 1 - correct - wrong
        shares = {"correct": correct, "other_language": 0.0, "wrong_expected_language": wrong, "other": other}
        key = {"mode": "generation", "scenario": "4", "shots": 3, "lang": lang, "n": n}
        return {**key, "other_detected": detected, **shares}

    cells = [
        cell("fr", 10, 0.5, 0.1, {"en": 0.4}),
        cell("de", 30, 0.1, 0.3, {"en": 0.2, "nl": 0.4}),
        cell("zh", 0, 0.0, 0.0, {}),  # no scored item: left out, not counted as zeros
    ]
    (line,) = scenario_means(cells)
    assert line["langs"] == ["fr", "de"]
    assert line["correct"] == pytest.approx(0.3) and line["wrong_expected_language"] == pytest.approx(0.2)
    assert line["other"] == pytest.approx(0.5) and line["other_english"] == pytest.approx(0.3)
