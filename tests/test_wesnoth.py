from pathlib import Path

import polib

from training.corpus.wesnoth import clean_string, iter_catalog_roots, locale_name


def write_catalog(root: Path, locale: str, entries: list[tuple[str, str]], plural: bool = False) -> None:
    catalog = polib.POFile()
    catalog.metadata = {"Content-Type": "text/plain; charset=UTF-8"}
    for msgid, msgstr in entries:
        catalog.append(polib.POEntry(msgid=msgid, msgstr=msgstr))
    if plural:
        catalog.append(
            polib.POEntry(
                msgid="one horse", msgid_plural="$n horses", msgstr_plural={0: "un cheval", 1: "$n chevaux"}
            )
        )
    folder = root / "usr/share/games/wesnoth/1.16/locale" / locale / "LC_MESSAGES"
    folder.mkdir(parents=True)
    catalog.save_as_mofile(str(folder / "wesnoth-test.mo"))


def test_clean_string_strips_markup_and_drops_wml():
    assert clean_string("<b>Hold</b> the line, $name!\u00a0{MACRO} &amp; @go") == "Hold the line, ! go"
    assert clean_string("id=leader") is None
    assert clean_string("  ") is None


def test_catalogs_align_translations_by_msgid(tmp_path):
    write_catalog(
        tmp_path,
        "fr",
        [
            ("Very well. Be careful!", "Très bien. Soyez prudent\u00a0!"),
            ("Untranslated line", "Untranslated line"),
            ("type=unit", "type=unité"),
        ],
        plural=True,
    )
    write_catalog(tmp_path, "zh_CN", [("Very well. Be careful!", "很好。小心！")])
    paragraphs = list(iter_catalog_roots([tmp_path], ["en", "fr", "zh"]))
    texts = {(p.lang, p.text) for p in paragraphs}
    assert texts == {
        ("en", "Very well. Be careful!"),
        ("fr", "Très bien. Soyez prudent !"),
        ("zh", "很好。小心！"),
    }
    assert len({p.parallel_id for p in paragraphs}) == 1, "translations of one msgid share a parallel id"
    assert locale_name("pt-br") == "pt_BR"
