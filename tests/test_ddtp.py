"""Debian package descriptions (DDTP): real stanzas of bookworm's Translation-fr / -zh_CN lists."""

from __future__ import annotations

from training.corpus.ddtp import DDTPSource, parse_translation_list

FR = """Package: 0ad
Description-md5: d943033bedada21853d2ae54a2578a7b
Description-fr: jeu de stratégie en temps réel de guerres anciennes
 0 A.D (prononcez « zéro aye-di ») est un jeu de stratégie en temps réel
 (RTS) libre et multiplate-forme de guerres anciennes.

Package: 0ad-data
Description-md5: 26581e685027d5ae84824362a4ba59ee
Description-fr: jeu de stratégie en temps réel de guerres anciennes - fichiers de données
 0 A.D (prononcez « zéro aye-di ») est un jeu de stratégie en temps réel
 (RTS) libre et multiplate-forme de guerres anciennes.
 .
 Ce paquet fournit les principaux fichiers de données nécessaires à 0 A.D.
"""

ZH = """Package: 0ad
Description-md5: d943033bedada21853d2ae54a2578a7b
Description-zh_CN: 古代战争实时策略游戏
 0 A.D. (发音"zero ey-dee") ，是一个自由、开源、跨平台的古代战争实时策略游戏。简而言之，
 它是一款基于历史的战争/经济游戏。
"""


def test_long_descriptions_split_into_aligned_paragraphs():
    paragraphs = list(parse_translation_list(FR, "fr"))
    game = (
        "0 A.D (prononcez « zéro aye-di ») est un jeu de stratégie en temps réel (RTS) libre et "
        "multiplate-forme de guerres anciennes."
    )
    assert [p.text for p in paragraphs] == [
        game,
        game,
        "Ce paquet fournit les principaux fichiers de données nécessaires à 0 A.D.",
    ]  # the synopsis line is a title and is left out; exact duplicates go in the corpus build
    assert [p.parallel_id for p in paragraphs] == [
        "ddtp:d943033bedada21853d2ae54a2578a7b:0",
        "ddtp:26581e685027d5ae84824362a4ba59ee:0",
        "ddtp:26581e685027d5ae84824362a4ba59ee:1",
    ]
    (zh,) = parse_translation_list(ZH, "zh")
    assert zh.parallel_id == paragraphs[0].parallel_id  # same English original, same id
    assert "，它是" in zh.text  # Chinese lines are joined without a space


def test_source_names_its_licence():
    assert "licence" in DDTPSource.licence and DDTPSource.name == "ddtp"
