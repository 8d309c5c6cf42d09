import pytest

from training.mixtures import PRESETS, MixtureError, count_chars, parse_mixture, sample_mixture


def test_presets_sum_to_one_and_have_the_promised_shape():
    for name, shares in PRESETS.items():
        assert sum(shares.values()) == pytest.approx(1.0), name
    assert PRESETS["en-heavy"]["en"] == pytest.approx(0.9)
    assert "en" not in PRESETS["no-en"]
    assert 0.01 <= PRESETS["en-heavy+eu"]["eu"] <= 0.02
    assert len(set(PRESETS["balanced"].values())) == 1


def test_parse_spec():
    assert parse_mixture("en=0.5,fr=0.2,de=0.3") == {"en": 0.5, "fr": 0.2, "de": 0.3}
    assert parse_mixture("balanced") == PRESETS["balanced"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("en=0.5,fr=0.2", "sum to 0.7000, not 1"),
        ("en=0.5,fr=x", "not a number"),
        ("en=1.5,fr=-0.5", "must be positive"),
        ("en=0.5,en=0.5", "appears twice"),
        ("english-mostly", "unknown mixture 'english-mostly'"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(MixtureError, match=message):
        parse_mixture(spec)


TEXTS = ["a" * 10] * 50 + ["b" * 10] * 20 + ["c" * 10] * 5
LANGS = ["en"] * 50 + ["fr"] * 20 + ["de"] * 5


def test_sampling_hits_shares_and_is_seeded():
    sample = sample_mixture(TEXTS, LANGS, {"en": 0.75, "fr": 0.25}, 200, count_chars, seed=1)
    assert sample.units == {"en": 150, "fr": 50}
    assert [LANGS[i] for i in sample.indices].count("fr") == 5
    assert sample.shares() == {"en": 0.75, "fr": 0.25}
    again = sample_mixture(TEXTS, LANGS, {"en": 0.75, "fr": 0.25}, 200, count_chars, seed=1)
    other = sample_mixture(TEXTS, LANGS, {"en": 0.75, "fr": 0.25}, 200, count_chars, seed=2)
    assert again.indices == sample.indices and other.indices != sample.indices


def test_unknown_language_error_lists_what_exists():
    with pytest.raises(
        MixtureError, match=r"asks for \['zh'\], but the corpus has only \['de', 'en', 'fr'\]"
    ):
        sample_mixture(TEXTS, LANGS, {"en": 0.5, "zh": 0.5}, 100, count_chars)


def test_too_many_tokens_error_says_how_much_there_is():
    with pytest.raises(
        MixtureError, match=r"asks for 250 characters of 'de' .* only 50 characters of 'de'.*at most 100"
    ):
        sample_mixture(TEXTS, LANGS, {"en": 0.5, "de": 0.5}, 500, count_chars, unit_name="characters")


def test_fitted_budget_keeps_the_shares_and_names_the_binding_language():
    # At 1000, de (50 characters) is short at 50 / 0.1 = 500 but fr (200) binds at 200 / 0.45 = 444.
    mixture = {"en": 0.45, "fr": 0.45, "de": 0.1}
    with pytest.raises(MixtureError, match=r"only 200 characters of 'fr'.*at most 444 "):
        sample_mixture(TEXTS, LANGS, mixture, 1000, count_chars, unit_name="characters")
    measured = []

    def counting(texts):
        measured.extend(texts)
        return count_chars(texts)

    fitted = sample_mixture(TEXTS, LANGS, mixture, 1000, counting, fit=True)
    assert len(measured) == len(TEXTS)  # the second draw re-measures nothing (each paragraph once)
    assert fitted.budget == 444 and fitted.units == {"en": 200, "fr": 200, "de": 50}
    direct = sample_mixture(TEXTS, LANGS, mixture, 444, count_chars)
    assert fitted.indices == direct.indices  # the same draw as asking for the fitted budget
    assert sample_mixture(TEXTS, LANGS, mixture, 300, count_chars, fit=True).budget == 300  # fits: untouched


def test_empty_split_and_bad_budget():
    with pytest.raises(MixtureError, match="empty"):
        sample_mixture([], [], {"en": 1.0}, 10, count_chars)
    with pytest.raises(MixtureError, match="positive"):
        sample_mixture(TEXTS, LANGS, {"en": 1.0}, 0, count_chars)
