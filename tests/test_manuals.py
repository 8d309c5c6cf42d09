"""Debian manuals as a corpus source: HTML paragraphs, languages from paths, licences, a real slice."""

from __future__ import annotations

from pathlib import Path

from training.corpus.manuals import ManualSource, html_paragraphs, package_licence, path_language

HTML = """<html><head><title>Skip me</title><style>p {}</style></head><body>
<div class="para">La commande <code class="command">apt-cache</code> permet de consulter
   la base de données d'APT.</div>
<pre class="screen">$ apt-cache policy</pre>
<ul><li>Premier point</li><li>Second <em>point</em></li></ul>
<p>Un paragraphe.<br>Une autre ligne.</p></body></html>"""


def test_html_paragraphs_keep_inline_markup_and_drop_listings():
    assert html_paragraphs(HTML) == [
        "La commande apt-cache permet de consulter la base de données d'APT.",
        "Premier point",
        "Second point",
        "Un paragraphe.",
        "Une autre ligne.",
    ]


def test_languages_from_paths():
    langs = ["en", "fr", "zh"]
    assert path_language(Path("usr/share/doc/debian-handbook/html/fr-FR/a.html"), langs) == "fr"
    assert path_language(Path("usr/share/doc/debian-handbook/html/en-US/a.html"), langs) == "en"
    assert path_language(Path("usr/share/doc/installation-guide-amd64/zh_CN/a.html"), langs) == "zh"
    assert path_language(Path("usr/share/debian-reference/ch01.fr.html"), langs) == "fr"
    assert path_language(Path("usr/share/doc/debian-handbook/html/pt-BR/a.html"), langs) is None


def test_licence_from_the_copyright_file(tmp_path):
    folder = tmp_path / "usr/share/doc/some-manual"
    folder.mkdir(parents=True)
    (folder / "copyright").write_text("Format: x\n\nFiles: *\nLicense: GPL-2.0+ or CC-BY-SA-3.0\n")
    assert package_licence(tmp_path, "some-manual") == "GPL-2.0+ or CC-BY-SA-3.0"
    assert "copyright file" in package_licence(tmp_path, "missing")


def test_real_debian_faq_in_english_and_french():
    """A small real slice (debian-faq + debian-faq-fr, ~1 MB, fetched once per machine)."""
    from training.corpus.build import default_cache_dir

    source = ManualSource("debian-faq", ["en", "fr"], default_cache_dir())
    paragraphs = list(source.iter_paragraphs())
    by_lang = {lang: [p.text for p in paragraphs if p.lang == lang] for lang in ("en", "fr")}
    assert len(by_lang["en"]) > 300 and len(by_lang["fr"]) > 300
    assert any("Debian" in text and "paquet" in text for text in by_lang["fr"])
    assert all(p.source == "debian-faq" and p.parallel_id is None for p in paragraphs)
    assert source.licence  # read from the packages' copyright files (or said to be there)
