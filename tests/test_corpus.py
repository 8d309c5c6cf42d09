import dataclasses
import json

import pytest

from training.corpus.build import CorpusConfig, build_corpus, drop_untranslated, load_corpus
from training.corpus.libreoffice import help_dir_name, package_name, parse_help_page, parse_help_page_marks
from training.corpus.sources import HFDatasetSource, Paragraph, PlainTextSource

PAGE = """<html><body>
<p id="par_id1" class="paragraph">Outside the display area: ignored.</p>
<div id="DisplayArea">
  <h1 id="hd_id10">Load/Save <b>options</b></h1>
  <p id="par_id11" class="paragraph">Choose <span class="switchinline"><span hidden="true" id="MACtext_1"
  class="MAC">
     <span class="emph">LibreOffice - Preferences</span></span><span hidden="true" id="defaulttext_1"><span
     class="emph">Tools -
     Options</span></span></span> - Load/Save.<br>Done &amp; saved.</p>
  <p id="par_id12" class="code">Sub Main</p>
  <p id="par_id13" class="paragraph">Second <img src="x.png">paragraph.</p>
  <p id="par_id11" class="paragraph">A repeated id is read once.</p>
  <p class="paragraph">No id: not a help paragraph.</p>
  <script>var par_id14 = "script text";</script>
</div>
<p id="par_id15">After the display area.</p>
</body></html>"""


def test_parse_help_page_cleans_variants_code_and_duplicates():
    assert parse_help_page(PAGE) == [
        ("hd_id10", "Load/Save options"),
        ("par_id11", "Choose Tools - Options - Load/Save.Done & saved."),
        ("par_id13", "Second paragraph."),
    ]


def test_marked_ui_terms_are_spans_of_the_same_cleaned_text():
    marks = parse_help_page_marks(PAGE)
    assert {pid: text for pid, (text, _) in marks.items()} == dict(parse_help_page(PAGE))
    text, spans = marks["par_id11"]
    assert spans == [(7, 22, "emph")] and text[7:22] == "Tools - Options"  # the hidden Mac variant is not
    assert marks["hd_id10"][1] == [] and marks["par_id13"][1] == []
    page = (
        '<div id="DisplayArea"><p id="par_id1">Choisissez <span class="menuitem">  Format -\n  Cellules '
        '</span> puis <span class="emph"><b>Hauteur</b> de ligne</span>.</p></div>'
    )
    text, spans = parse_help_page_marks(page)["par_id1"]
    assert text == "Choisissez Format - Cellules puis Hauteur de ligne."
    assert [(text[a:b], c) for a, b, c in spans] == [
        ("Format - Cellules", "menuitem"),
        ("Hauteur de ligne", "emph"),
    ]


def test_language_names_map_to_debian_packages():
    assert package_name("en") == "libreoffice-help-en-us"
    assert package_name("zh") == "libreoffice-help-zh-cn"
    assert package_name("eu") == "libreoffice-help-eu"
    assert (
        help_dir_name("en") == "en-US"
        and help_dir_name("zh") == "zh-CN"
        and help_dir_name("pt-br") == "pt-BR"
    )


def test_drop_untranslated_fallbacks():
    paragraphs = [
        Paragraph("Save the file.", "en", "s", "p1"),
        Paragraph("Save the file.", "fr", "s", "p1"),  # untranslated: identical to English
        Paragraph("Enregistrez le fichier.", "de", "s", "p1"),
        Paragraph("Save the file.", "de", "s", None),  # unaligned: kept
    ]
    kept, dropped = drop_untranslated(paragraphs, "en")
    assert [p.lang for p in kept] == ["en", "de", "de"]
    assert dropped == {"fr": 1}


EN = [
    "The document is saved automatically every ten minutes when this option is enabled.",
    "Choose a folder where the backup copies of your documents should be stored.",
    "This setting controls how many undo steps the program remembers for each file.",
    "Select the default file format that new text documents are saved in.",
    "Spreadsheets can be exported to several formats, including comma separated values.",
    "The printer settings apply to every document until you change them again.",
]
FR = [
    "Le document est enregistré automatiquement toutes les dix minutes lorsque cette option est activée.",
    "Choisissez un dossier dans lequel les copies de sauvegarde de vos documents seront stockées.",
    "Ce paramètre détermine combien d'étapes d'annulation le programme mémorise pour chaque fichier.",
    "Sélectionnez le format de fichier par défaut dans lequel les nouveaux documents texte sont enregistrés.",
    "Les classeurs peuvent être exportés dans plusieurs formats, y compris les valeurs séparées "
    "par des virgules.",
    # A mislabelled paragraph: German text in the French file. The language identifier must drop it.
    "Die Druckereinstellungen gelten für jedes Dokument, bis Sie sie wieder ändern, und werden gespeichert.",
]


@pytest.fixture
def aligned_text_files(tmp_path):
    (tmp_path / "en.txt").write_text("\n\n".join(EN))
    (tmp_path / "fr.txt").write_text("\n\n".join(FR))
    return {"en": tmp_path / "en.txt", "fr": tmp_path / "fr.txt"}


def test_build_corpus_from_plain_text(tmp_path, aligned_text_files):
    config = CorpusConfig(
        corpus_dir=str(tmp_path / "corpus"),
        langs=["en", "fr"],
        sources=[],
        n_parallel=2,
        val_fraction=0.0,
        seed=3,
    )  # 0 still keeps one validation paragraph per language
    corpus = build_corpus(config, sources=[PlainTextSource(aligned_text_files, aligned=True)])
    assert set(corpus) == {"train", "validation", "parallel"}
    assert corpus["train"].column_names == ["text", "lang", "source", "parallel_id", "detected_lang"]
    every_text = [t for split in corpus.values() for t in split["text"]]
    assert FR[5] not in every_text, "the German paragraph labelled French must be dropped"
    parallel = corpus["parallel"]
    ids_by_lang = {
        lang: {pid for pid, l in zip(parallel["parallel_id"], parallel["lang"]) if l == lang}
        for lang in ("en", "fr")
    }
    assert ids_by_lang["en"] == ids_by_lang["fr"] and len(ids_by_lang["en"]) == 2
    assert not ids_by_lang["en"] & set(corpus["train"]["parallel_id"]), (
        "held-out parallel paragraphs leaked into train"
    )
    assert all(d == l for d, l in zip(corpus["train"]["detected_lang"], corpus["train"]["lang"]))
    assert sorted(corpus["validation"]["lang"]) == ["en", "fr"]
    stats = json.loads((tmp_path / "corpus" / "corpus_stats.json").read_text())
    assert stats["langid_on_all_cleaned_paragraphs"]["fr"]["accuracy"] == pytest.approx(5 / 6)
    assert load_corpus(tmp_path / "corpus")["train"].num_rows == corpus["train"].num_rows
    assert not (tmp_path / "corpus.partial").exists()


def test_hf_dataset_source_on_a_local_dataset(tmp_path):
    rows = [{"content": t, "language": "en", "pid": i} for i, t in enumerate(EN)]
    rows += [{"content": t, "language": "fr", "pid": i} for i, t in enumerate(FR[:5])]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    source = HFDatasetSource(
        "json", text_column="content", lang_column="language", data_files=str(path), parallel_id_column="pid"
    )
    paragraphs = list(source.iter_paragraphs())
    assert len(paragraphs) == 11 and paragraphs[0] == Paragraph(EN[0], "en", "hf:json", "hf:json:0")
    corpus = build_corpus(
        CorpusConfig(
            corpus_dir=str(tmp_path / "c"),
            langs=["en", "fr"],
            sources=[],
            n_parallel=3,
            val_fraction=0.0,
        ),
        sources=[source],
    )
    assert corpus["parallel"].num_rows == 6


def test_hf_source_errors_name_the_columns(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"body": "x", "lang": "en"}))
    with pytest.raises(KeyError, match="columns are \\['body', 'lang'\\]"):
        list(HFDatasetSource("json", text_column="text", lang="en", data_files=str(path)).iter_paragraphs())
    with pytest.raises(ValueError, match="exactly one of"):
        HFDatasetSource("json", lang="en", lang_column="lang")


def test_missing_language_and_missing_corpus_errors(tmp_path, aligned_text_files):
    config = CorpusConfig(corpus_dir=str(tmp_path / "c"), langs=["en", "fr", "ja"], sources=[], n_parallel=1)
    with pytest.raises(
        ValueError, match=r"no text found for languages \['ja'\]; languages with text: \['en', 'fr'\]"
    ):
        build_corpus(config, sources=[PlainTextSource(aligned_text_files, aligned=True)])
    with pytest.raises(FileNotFoundError, match="build one with"):
        load_corpus(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="not found"):
        PlainTextSource({"en": tmp_path / "missing.txt"})


def test_real_libreoffice_slice(real_slice_corpus_dir):
    """A real slice fetched from Debian: aligned, cleaned, language-checked."""
    corpus = load_corpus(real_slice_corpus_dir)
    train = corpus["train"]
    assert set(train["lang"]) == {"en", "fr", "de"}
    assert train.num_rows > 1500
    assert not any("CommandCtrl" in t or "LibreOffice - Preferences" in t for t in train["text"]), (
        "Mac variants leaked"
    )
    parallel = corpus["parallel"]
    assert parallel.num_rows == 3 * 40
    by_id = {}
    for pid, lang, text in zip(parallel["parallel_id"], parallel["lang"], parallel["text"]):
        by_id.setdefault(pid, {})[lang] = text
    assert all(set(v) == {"en", "fr", "de"} for v in by_id.values())
    assert all(len({v["en"], v["fr"], v["de"]}) == 3 for v in by_id.values()), (
        "untranslated fallbacks in parallel split"
    )
    train_texts = set(zip(train["lang"], train["text"]))
    assert not any((l, t) in train_texts for l, t in zip(parallel["lang"], parallel["text"]))
    stats = json.loads((real_slice_corpus_dir / "corpus_stats.json").read_text())
    assert stats["langid_on_cleaned_long_ge40"]["en"]["accuracy"] > 0.95


def test_other_sources_cannot_leak_held_out_text_or_repeat_it(tmp_path, aligned_text_files):
    """A second source quoting a held-out paragraph (shared 8-gram) loses that paragraph; one repeating a
    first-source paragraph with other punctuation is counted once; the rest of it stays."""
    config = CorpusConfig(
        corpus_dir=str(tmp_path / "c"), langs=["en", "fr"], sources=[], n_parallel=2, val_fraction=0.0, seed=3
    )
    held_out_source = PlainTextSource(aligned_text_files, aligned=True)
    reference = build_corpus(
        dataclasses.replace(config, corpus_dir=str(tmp_path / "ref")), sources=[held_out_source]
    )
    held_out_en = [
        t for t, l in zip(reference["parallel"]["text"], reference["parallel"]["lang"]) if l == "en"
    ]
    train_en = [t for t, l in zip(reference["train"]["text"], reference["train"]["lang"]) if l == "en"]
    quote = "As the manual says: " + held_out_en[0]
    repeat = train_en[0].upper().replace(".", "!")
    fresh = "Our extra source writes a completely new sentence about spreadsheets, charts and macros."
    (tmp_path / "extra.txt").write_text("\n\n".join([quote, repeat, fresh]))
    extra = PlainTextSource({"en": tmp_path / "extra.txt"}, name="extra")
    corpus = build_corpus(config, sources=[held_out_source, extra])
    texts = {t for split in ("train", "validation") for t in corpus[split]["text"]}
    assert fresh in texts and quote not in texts and repeat not in texts
    assert sorted(corpus["parallel"]["text"]) == sorted(reference["parallel"]["text"])  # same evaluation set
    stats = json.loads((tmp_path / "c" / "corpus_stats.json").read_text())
    assert stats["cross_source_near_duplicates_dropped"] == 1
    assert stats["held_out_ngram_overlap"]["by_source"]["extra"] == 1


def test_existing_corpus_is_reused_only_with_the_same_settings(tmp_path, aligned_text_files):
    from training.errors import ConfigMismatch

    source = PlainTextSource(aligned_text_files, aligned=True)
    config = CorpusConfig(
        corpus_dir=str(tmp_path / "c"), langs=["en", "fr"], sources=[], n_parallel=2, seed=3
    )
    first = build_corpus(config, sources=[source])
    again = build_corpus(dataclasses.replace(config, workers=1), sources=[source])  # build-only setting
    assert again["train"]["text"] == first["train"]["text"]
    with pytest.raises(ConfigMismatch, match=r"other settings \(n_parallel: 2 → 3\)"):
        build_corpus(dataclasses.replace(config, n_parallel=3), sources=[source])
    build_corpus(dataclasses.replace(config, n_parallel=3, overwrite=True), sources=[source])
    # A corpus recorded by the version before --sources (libreoffice/wesnoth switches, out_dir) still loads.
    stats_path = tmp_path / "c" / "corpus_stats.json"
    stats = json.loads(stats_path.read_text())
    legacy = {k: v for k, v in stats["config"].items() if k not in ("sources", "min_chars", "corpus_dir")}
    stats["config"] = {**legacy, "out_dir": "x", "libreoffice": True, "wesnoth": False}
    stats_path.write_text(json.dumps(stats))
    build_corpus(
        dataclasses.replace(config, n_parallel=3, sources=["libreoffice"])
    )  # reused, nothing fetched
    with pytest.raises(ConfigMismatch, match="sources"):
        build_corpus(dataclasses.replace(config, n_parallel=3, sources=["libreoffice", "wesnoth"]))
