"""Cross-source cleaning on hand-made cases: near-duplicates across sources, leaks into held-out text."""

from __future__ import annotations

from training.corpus.cleaning import (
    LeakIndex,
    drop_cross_source_near_duplicates,
    near_duplicate_key,
    ngrams,
    wrong_script,
)
from training.corpus.sources import Paragraph


def test_near_duplicates_are_dropped_across_sources_only():
    a = Paragraph("Click OK to close the dialog.", "en", "libreoffice-help")
    b = Paragraph("click ok to close the dialog", "en", "wesnoth")  # same words, other case/punctuation
    c = Paragraph("Click OK, to close the dialog!", "en", "libreoffice-help")  # same source: kept
    d = Paragraph("Click OK to close the dialog.", "fr", "wesnoth")  # another language: kept
    e = Paragraph("Click Cancel to close the dialog.", "en", "wesnoth")  # other words: kept
    kept, dropped = drop_cross_source_near_duplicates([a, b, c, d, e])
    assert kept == [a, c, d, e] and dropped == 1
    assert near_duplicate_key("Ｃｌｉｃｋ ＯＫ 2") == near_duplicate_key("click ok")  # NFKC, digits, case


def test_ngrams_words_and_characters():
    assert list(ngrams("one two three four five six seven eight nine", "en")) == [
        "one two three four five six seven eight",
        "two three four five six seven eight nine",
    ]
    assert list(ngrams("too short to share", "en")) == []
    assert len(list(ngrams("你好" * 10, "zh"))) == 20 - 16 + 1


def test_leak_index_flags_shared_eight_grams_per_language():
    held_out = [
        ("en", "Choose Format - Cells and set the number format of the selected cells."),
        ("zh", "选择格式单元格并设置所选单元格的数字格式然后单击确定"),
    ]
    index = LeakIndex(held_out)
    assert index.leaks("Tip: choose format, cells and set the number format of the table.", "en")
    assert not index.leaks("Choose Format - Cells to open the dialog.", "en")  # shares only 4 words
    assert not index.leaks("choose format cells and set the number format of the selected cells", "fr")
    assert index.leaks("提示：选择格式单元格并设置所选单元格的数字格式", "zh")
    assert not index.leaks("选择格式单元格", "zh")


def test_wrong_script_on_hand_made_lines():
    # Russian and Greek pages with an English passage left untranslated.
    assert not wrong_script("Нажмите кнопку «Сохранить», чтобы записать файл.", "ru")
    assert wrong_script("Click Save to write the file (see the Save dialog).", "ru")
    assert wrong_script("Откройте Tools - Options - LibreOffice Writer - General settings now", "ru")
    assert not wrong_script("Πατήστε το κουμπί Αποθήκευση για να γράψετε το αρχείο.", "el")
    assert wrong_script("Press the Save button to write the file.", "el")
    # Chinese has Han and no kana; Japanese needs hiragana.
    assert not wrong_script("单击保存按钮以写入文件。", "zh")
    assert wrong_script("保存ボタンをクリックしてファイルを書き込みます。", "zh")
    assert not wrong_script("保存ボタンをクリックしてファイルを書き込みます。", "ja")
    assert wrong_script("单击保存按钮以写入文件。", "ja")
    assert wrong_script("Click the Save button.", "zh")
    # ... but Chinese technical text full of English names is Chinese.
    assert not wrong_script("选择「插入 - 层」 (只适用于 LibreOffice Draw)", "zh")
    assert not wrong_script("建议使用 apt full-upgrade 来进行这个操作。", "zh")
    # Latin-script languages: a Russian line labelled French is refused; accents count as Latin.
    assert not wrong_script("Cliquez sur « Enregistrer » pour écrire le fichier ; voilà.", "fr")
    assert wrong_script("Нажмите кнопку, чтобы записать файл.", "fr")
    # Letters only are counted: digits and punctuation do not dilute the share; no letters at all fails.
    assert not wrong_script("Версия 7.5.1 (2023-01-01): 100% готово!", "ru")
    assert wrong_script("12345 — 678.90", "en")
    # No rule for a language: it passes.
    assert not wrong_script("Any text at all", "xx")
