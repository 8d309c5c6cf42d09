import pytest
from transformers import AutoTokenizer

from training.tokenizer import EOS_TOKEN, PAD_TOKEN, count_tokens, fertility, train_bpe_tokenizer

TEXTS = [
    "the cat sat on the mat " * 3,
    "le chat est sur le tapis " * 3,
    "猫坐在垫子上。" * 3,
    "кошка сидит на коврике " * 3,
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXTS * 20, vocab_size=300)


@pytest.mark.parametrize(
    "text",
    [
        "the cat sat",
        "Überraschung — ça va? 猫坐在垫子上。",
        "emoji 🐈‍⬛ and tabs\tand\nnewlines",
        "Kaixo, zer moduz? Ez dut ulertzen.",
    ],
)
def test_round_trip_is_exact_for_any_text(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_special_tokens_and_vocab(tokenizer):
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.pad_token_id == 0
    assert tokenizer.eos_token == tokenizer.bos_token == EOS_TOKEN and tokenizer.eos_token_id == 1
    assert len(tokenizer) == 300


def test_save_and_load_as_hf_fast_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.is_fast
    text = "le chat sat on 垫子"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.eos_token_id == 1


def test_fertility_units(tokenizer):
    report = fertility(tokenizer, ["the cat sat", "猫坐在垫子上"], ["en", "zh"])
    n_en = len(tokenizer("the cat sat", add_special_tokens=False)["input_ids"])
    n_zh = len(tokenizer("猫坐在垫子上", add_special_tokens=False)["input_ids"])
    assert (
        report["en"]["fertility"] == pytest.approx(n_en / 3)
        and report["en"]["fertility_unit"] == "tokens/word"
    )
    assert (
        report["zh"]["fertility"] == pytest.approx(n_zh / 6)
        and report["zh"]["fertility_unit"] == "tokens/char"
    )
    assert count_tokens(tokenizer)(["the cat sat", "猫坐在垫子上"]) == [n_en, n_zh]


def test_too_small_vocab_is_rejected():
    with pytest.raises(ValueError, match="at least 258"):
        train_bpe_tokenizer(TEXTS, vocab_size=100)
