from pathlib import Path

import polib

from training.corpus.catalogs import GAMES, CatalogSource, clean_string, iter_catalogs, locale_folders


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
    folder = root / "usr/share/games/some-game/locale" / locale / "LC_MESSAGES"
    folder.mkdir(parents=True)
    catalog.save_as_mofile(str(folder / "wesnoth-test.mo"))


def test_clean_string_strips_markup_and_drops_wml():
    assert clean_string("<b>Hold</b> the line, $name!\u00a0{MACRO} &amp; @go") == "Hold the line, ! go"
    assert clean_string("You have %d items and %1$s coins.") == "You have items and coins."
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
    paragraphs = list(iter_catalogs([tmp_path], ["en", "fr", "zh"], "some-game"))
    texts = {(p.lang, p.text) for p in paragraphs}
    assert texts == {
        ("en", "Very well. Be careful!"),
        ("fr", "Très bien. Soyez prudent !"),
        ("zh", "很好。小心！"),
    }
    assert len({p.parallel_id for p in paragraphs}) == 1, "translations of one msgid share a parallel id"
    assert locale_folders("pt-br") == ("pt_BR",) and locale_folders("fr") == ("fr", "fr_FR")
    assert "es_AR" in locale_folders("es") and locale_folders("zh")[0] == "zh_CN"


def test_every_game_names_its_licence():
    assert all(game.licence and game.packages for game in GAMES.values())


def test_real_minetest_catalogs(tmp_path):
    """A small real slice (minetest-data, 3.6 MB, fetched from Debian once per machine into the cache):
    translations align with their English msgid, the licence is carried, placeholders are gone."""
    from training.corpus.build import default_cache_dir

    source = CatalogSource("minetest", ["en", "fr", "de"], default_cache_dir())
    assert source.licence.startswith("LGPL-2.1+")
    paragraphs = list(source.iter_paragraphs())
    by_id: dict[str, dict[str, str]] = {}
    for p in paragraphs:
        by_id.setdefault(p.parallel_id, {})[p.lang] = p.text
        assert p.source == "minetest" and "%s" not in p.text and "$" not in p.text
    assert by_id[next(pid for pid, t in by_id.items() if t.get("en") == "Check debug.txt for details.")][
        "fr"
    ] == ("Voir « debug.txt » pour plus d'informations.")
    complete = [t for t in by_id.values() if set(t) == {"en", "fr", "de"}]
    assert len(complete) > 500  # hundreds of strings translated into both
