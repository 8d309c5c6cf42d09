"""Byte-level BPE tokenizers (trained with `tokenizers`), saved as Hugging Face fast tokenizers.

Special tokens: `<|pad|>` (id 0) and `<|endoftext|>` (id 1), which is BOS, EOS and document separator.
Keeping the BOS id non-zero matters downstream: circuit-tracer treats id 0 specially.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN]
# Scripts written without spaces between words: fertility is tokens per character there.
PER_CHAR_LANGS = {"zh", "ja", "th", "km", "lo", "my"}


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (all bytes + special tokens), got "
            f"{vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable: no unknown token
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(tokenizer)


def wrap_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        clean_up_tokenization_spaces=False,
    )


def count_tokens(tokenizer: PreTrainedTokenizerFast) -> "callable":
    """A batch length function (texts → token counts) for `mixtures.sample_mixture`."""

    def measure(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    return measure


def fertility(
    tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], langs: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Per language: tokens per whitespace word, tokens per character, and the headline number
    (`fertility`: per character for scripts without spaces, per word otherwise)."""
    totals: dict[str, dict[str, int]] = defaultdict(
        lambda: {"tokens": 0, "words": 0, "chars": 0, "paragraphs": 0}
    )
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    for ids, text, lang in zip(encoded, texts, langs):
        entry = totals[lang]
        entry["tokens"] += len(ids)
        entry["words"] += len(text.split())
        entry["chars"] += len(text)
        entry["paragraphs"] += 1
    report = {}
    for lang, entry in sorted(totals.items()):
        per_word = entry["tokens"] / max(entry["words"], 1)
        per_char = entry["tokens"] / max(entry["chars"], 1)
        report[lang] = {
            "tokens_per_word": per_word,
            "tokens_per_char": per_char,
            "fertility": per_char if lang in PER_CHAR_LANGS else per_word,
            "fertility_unit": "tokens/char" if lang in PER_CHAR_LANGS else "tokens/word",
            "paragraphs": entry["paragraphs"],
        }
    return report
