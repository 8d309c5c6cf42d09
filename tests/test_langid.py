import pytest

from training import langid

SENTENCES = {
    "en": "The quick brown fox jumps over the lazy dog while the farmer watches from the house.",
    "fr": "Le renard brun rapide saute par-dessus le chien paresseux pendant que le fermier regarde.",
    "de": "Der schnelle braune Fuchs springt über den faulen Hund, während der Bauer vom Haus zusieht.",
    "es": "El rápido zorro marrón salta sobre el perro perezoso mientras el granjero mira desde la casa.",
    "ru": "Это очень хороший день, и я иду гулять в парк с моими друзьями.",
    "zh": "今天天气很好，我和朋友们一起去公园散步，然后在餐厅吃午饭。",
    "eu": "Gaur eguraldi ona dago eta lagunekin parkera paseatzera noa, gero jatetxean bazkaltzeko.",
}


@pytest.mark.parametrize("lang", sorted(SENTENCES))
def test_detects_every_default_language(lang):
    assert langid.detect(SENTENCES[lang]) == lang


def test_unknown_for_empty_and_noise():
    assert langid.detect("") == langid.UNKNOWN
    assert langid.detect("   ") == langid.UNKNOWN
    assert langid.detect("1234 5678 %%% ###") == langid.UNKNOWN


def test_consistency_counts_hits_and_unknowns():
    texts = [SENTENCES["en"], SENTENCES["fr"], "", SENTENCES["de"]]
    report = langid.consistency(texts, ["en", "en", "en", "de"])
    assert report == {"n": 4, "consistent": 0.5, "unknown": 0.25}
    with pytest.raises(ValueError, match="2 texts but 1"):
        langid.consistency(["a", "b"], ["en"])


def test_accuracy_by_language():
    report = langid.accuracy_by_language(
        [SENTENCES["en"], SENTENCES["fr"], SENTENCES["fr"]], ["en", "fr", "de"]
    )
    assert report["en"]["accuracy"] == 1.0
    assert report["fr"]["accuracy"] == 1.0
    assert report["de"]["accuracy"] == 0.0 and report["de"]["confusions"] == {"fr": 1}
