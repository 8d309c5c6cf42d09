"""Train a residual-stream SAE with sae-lens on our GPT-2 (the control for CLT-feature steering).

    python scripts/train_sae.py                                   # default model, residual after layer 2
    python scripts/train_sae.py --model-dir runs/tiny-balanced/model --layer 1 --out runs/sae-balanced-l1

Blocks of `[BOS] + 63 tokens` are sampled from the corpus's training split, equally per language, and
fed to sae-lens's own training runner on a TransformerLens copy of the model (interventions/sae.py).
The SAE is saved in sae-lens's format in --out (`SAE.load_from_disk`), with held-out reconstruction
(FVU) and L0 in --out/eval.json.
"""

import json
from dataclasses import dataclass, field

import torch

from analysis.residuals import residual_stream
from analysis.text_blocks import blocks_by_lang, texts_by_lang
from analysis.token_language import corpus_texts_by_lang
from interventions.sae import load_sae, train_residual_sae
from training import paths
from training.config import atomic_write_json, parse_config
from training.corpus.build import default_corpus_dir, load_corpus


@dataclass
class SAEConfig:
    """Train a residual SAE with sae-lens."""

    model_dir: str = field(default=paths.MODEL_DIR, metadata={"help": "HF model directory"})
    layer: int = field(default=2, metadata={"help": "the SAE reads the residual after this block"})
    out: str = field(
        default="runs/sae-tiny-en-heavy-l2", metadata={"help": "output directory (sae-lens format)"}
    )
    corpus_dir: str | None = field(default=None, metadata={"help": "corpus (default: the built corpus)"})
    langs: list[str] = field(
        default_factory=lambda: ["en", "fr", "de", "es", "ru", "zh"],
        metadata={"help": "languages, equal shares"},
    )
    texts_per_lang: int = field(default=3000, metadata={"help": "training paragraphs per language"})
    n_ctx: int = field(default=64, metadata={"help": "block length (BOS included)"})
    d_sae: int = field(default=1024, metadata={"help": "SAE latents"})
    training_tokens: int = field(default=500_000, metadata={"help": "tokens to train on"})
    l1_coefficient: float = field(
        default=2.0, metadata={"help": "sparsity penalty (on inputs normalised to norm sqrt(d))"}
    )
    seed: int = field(default=0, metadata={"help": "seed"})


def main(argv=None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = parse_config(SAEConfig, argv)
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_pretrained(config.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(config.model_dir)
    if not 0 <= config.layer < model.config.n_layer:
        raise SystemExit(f"--layer must be in 0…{model.config.n_layer - 1}")
    texts = corpus_texts_by_lang(config.corpus_dir, config.langs, "train", config.texts_per_lang, config.seed)
    per_lang = blocks_by_lang(tokenizer, texts, config.n_ctx, 10**9)
    n = min(len(b) for b in per_lang.values())  # equal shares
    blocks = torch.cat([b[:n] for b in per_lang.values()])
    blocks = blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(config.seed))]
    train_residual_sae(
        model,
        tokenizer,
        blocks,
        config.layer,
        config.out,
        config.d_sae,
        config.training_tokens,
        config.l1_coefficient,
        seed=config.seed,
    )
    sae = load_sae(config.out)
    corpus = load_corpus(config.corpus_dir or default_corpus_dir())
    held_out = blocks_by_lang(tokenizer, texts_by_lang(corpus["validation"], config.langs), config.n_ctx, 16)
    report = {}
    with torch.no_grad():
        for lang, lang_blocks in held_out.items():
            hidden = residual_stream(model, lang_blocks)[config.layer][:, 1:]
            z = sae.encode(hidden)
            error = (sae.decode(z) - hidden).pow(2).sum()
            report[lang] = {
                "fvu": float(error / (hidden - hidden.mean((0, 1))).pow(2).sum()),
                "l0": float((z > 0).float().sum(-1).mean()),
            }
    atomic_write_json(f"{config.out}/eval.json", {"config": vars(config), "heldout": report})
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
