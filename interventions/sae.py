"""A residual-stream SAE trained with sae-lens on our GPT-2 — the field's usual steering tool, used as a
control for CLT-feature steering.

Training runs sae-lens's own `LanguageModelSAETrainingRunner` on a TransformerLens copy of our model
(`attribution.circuit_tracer_bridge.hooked_transformer`) and a pre-tokenised `datasets.Dataset` of
`[BOS] + 63 tokens` blocks from the corpus, offline. The result is saved in sae-lens's format
(`cfg.json` + `sae_weights.safetensors`, loadable with `sae_lens.SAE.load_from_disk`). The hook
`blocks.{l}.hook_resid_post` is the residual after block l — our `residual_stream(model, ids)[l]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interventions.hooks import Edit, Where, _apply
from training import paths
from training.errors import UserError


def train_residual_sae(
    model,
    tokenizer,
    blocks: Int[Tensor, "n pos"],
    layer: int,
    out_dir: str | Path,
    d_sae: int = 1024,
    training_tokens: int = 1_000_000,
    l1_coefficient: float = 2.0,
    lr: float = 3e-4,
    seed: int = 0,
):
    from datasets import Dataset
    from sae_lens import (
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
        StandardTrainingSAEConfig,
    )

    from attribution.circuit_tracer_bridge import hooked_transformer

    out_dir = Path(out_dir)
    hooked = hooked_transformer(model, tokenizer)
    dataset = Dataset.from_dict({"input_ids": blocks.tolist()})
    config = LanguageModelSAERunnerConfig(
        # Inputs scaled to norm sqrt(d) (sae-lens folds the factor back in when saving) and BOS excluded:
        # the BOS position's residual is an outlier in norm that otherwise dominates the reconstruction loss.
        sae=StandardTrainingSAEConfig(
            d_in=model.config.n_embd,
            d_sae=d_sae,
            l1_coefficient=l1_coefficient,
            l1_warm_up_steps=100,
            normalize_activations="expected_average_only_in",
            device="cpu",
            dtype="float32",
        ),
        model_name="multilingual-clt-gpt2",
        hook_name=f"blocks.{layer}.hook_resid_post",
        dataset_path="local",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=blocks.shape[1],
        prepend_bos=False,
        training_tokens=training_tokens,
        train_batch_size_tokens=1024,
        store_batch_size_prompts=16,
        n_batches_in_buffer=max(8, 4 * 1024 // blocks.shape[1]),  # sae-lens: buffer = this × context ≥ batch
        lr=lr,
        lr_warm_up_steps=50,
        device="cpu",
        seed=seed,
        dtype="float32",
        n_checkpoints=0,
        checkpoint_path=None,
        output_path=str(out_dir),
        logger=LoggingConfig(log_to_wandb=False),
        verbose=False,
        n_batches_for_norm_estimate=20,
        exclude_special_tokens=[int(blocks[0, 0])],
    )
    runner = LanguageModelSAETrainingRunner(config, override_dataset=dataset, override_model=hooked)
    return runner.run()


def load_sae(path: str | Path):
    from sae_lens import SAE

    path = Path(path)
    if not (path / "cfg.json").exists():
        raise FileNotFoundError(f"no sae-lens SAE at {path} (expected cfg.json + sae_weights.safetensors)")
    return SAE.load_from_disk(str(path), device="cpu").eval()


def sae_layer(path: str | Path) -> int:
    """The block whose output residual the SAE reads (from its cfg.json hook name)."""
    import json
    import re

    cfg = json.loads((Path(path) / "cfg.json").read_text())
    hook = cfg.get("metadata", {}).get("hook_name") or cfg.get("hook_name", "")
    match = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", hook)
    if not match:
        raise ValueError(f"{path}: expected an SAE on blocks.L.hook_resid_post, found hook {hook!r}")
    return int(match.group(1))


def sae_activation_probability(
    model, sae, layer: int, blocks_by_lang: dict[str, Tensor], batch_size: int = 16
) -> Float[Tensor, "1 latent lang"]:
    """Share of (non-BOS) tokens of each language on which each SAE latent is active — the input to
    `analysis.language_features.language_features` (one 'layer')."""
    from analysis.firing import firing_share
    from analysis.residuals import residual_stream

    def latents(ids: Tensor) -> Tensor:
        return sae.encode(residual_stream(model, ids)[layer])[None]

    return firing_share(latents, blocks_by_lang, batch_size, next(model.parameters()).device)


@dataclass
class SAEEdit(Edit):
    """Set / add / scale SAE latents of the residual after block `layer`; the change Δz is written back
    through the SAE decoder (residual += Δz · W_dec), the SAE's reconstruction error is left alone."""

    layer: int
    sae: object
    latents: list[int]
    mode: str = "set"
    value: float = 0.0
    where: Where = field(default_factory=Where)

    def named_hooks(self, positions):
        index = torch.tensor(list(self.latents))

        def hook(hidden: Tensor) -> Tensor:
            z = self.sae.encode(hidden.to(self.sae.W_dec.dtype))
            current = z[..., index]
            mask = self.where.mask(positions(hidden.shape[1], hidden.device))[None, :, None]
            new = torch.where(mask, _apply(self.mode, current, self.value), current)
            delta = (new - current) @ self.sae.W_dec[index]
            return hidden + delta.to(hidden.dtype)

        return [(f"blocks.{self.layer}.hook_resid_post", hook)]


@dataclass
class SAEConfig:
    """Train a residual SAE with sae-lens."""

    model_dir: str = field(default=paths.MODEL_DIR, metadata={"help": "HF model directory"})
    layer: int = field(default=2, metadata={"help": "the SAE reads the residual after this block"})
    run_dir: str = field(
        default="runs/sae-tiny-en-heavy-l2",
        metadata={"help": "run directory, also the SAE's (sae-lens format)"},
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
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})


def train_sae(config: SAEConfig) -> dict:
    """Train the SAE with sae-lens's runner, save it in the run directory, and evaluate it held out."""
    from analysis.residuals import residual_stream
    from analysis.text_blocks import blocks_by_lang, texts_by_lang
    from analysis.token_language import corpus_texts_by_lang
    from training.config import RunDir, atomic_write_json
    from training.corpus.build import default_corpus_dir, load_corpus
    from training.models import load_model

    run = RunDir.open(config.run_dir, config)
    torch.manual_seed(config.seed)
    model, tokenizer = load_model(config.model_dir, config.device)
    if not 0 <= config.layer < model.config.n_layer:
        raise UserError(f"--layer must be in 0…{model.config.n_layer - 1}")
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
        str(run.path),
        config.d_sae,
        config.training_tokens,
        config.l1_coefficient,
        seed=config.seed,
    )
    sae = load_sae(run.path)
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
    atomic_write_json(run.path / "eval.json", {"config": vars(config), "heldout": report})
    return report
