"""Train a crosscoder on two models' paired activations, with the CLT's loss and training loop.

`train_crosscoder(CrosscoderTrainConfig(...))` collects each model's store if missing (the ordinary
collection, same settings for both, so the same tokens), pairs them (clt/paired.py: checked token for
token), trains the crosscoder (clt/crosscoder.py) with `clt.train._fit` — warm-up, λ ramp, clipping,
dead-latent tracking, checkpoints with exact resume, JSONL metrics, DDP — and writes the crosscoder
(`crosscoder/crosscoder.safetensors` + `config.json`) and summary.json: held-out FVU per model and site,
L0, never-active latents, the relative-decoder-norm histogram with A-only / B-only / shared counts, and
latent scaling (ν) of the model-specific latents.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from clt.activations import CollectConfig, CollectOptions, collect_activations
from clt.crosscoder import Crosscoder, CrosscoderConfig, CrosscoderOptions, classify_latents, latent_scaling
from clt.loader import StoreLoader
from clt.paired import PairedStore
from clt.store import ActivationStore, StoreNotFound
from training.checkpoint import find_checkpoint
from training.config import atomic_write_json
from training.errors import UserError
from training.loop import resume, start_run

WEIGHTS, CONFIG = "crosscoder.safetensors", "config.json"


@dataclass
class CrosscoderTrainConfig:
    """Train a crosscoder on the paired activations of two models (before → after fine-tuning)."""

    run_dir: str = field(default="runs/crosscoder", metadata={"help": "run directory (resumed)"})
    model_a: str = field(default="", metadata={"help": "model A (before), an HF model directory"})
    model_b: str = field(default="", metadata={"help": "model B (after), an HF model directory"})
    store_a: str = field(default="", metadata={"help": "model A's activation store (collected if missing)"})
    store_b: str = field(default="", metadata={"help": "model B's activation store (collected if missing)"})
    site: str = field(default="mlp_out", metadata={"help": "mlp_out or mlp_in"})
    layers: list[int] = field(default_factory=lambda: [-1], metadata={"help": "layers read (-1 = the last)"})
    corpus_dir: str | None = field(default=None, metadata={"help": "corpus for collection (default corpus)"})
    collect: CollectOptions = field(
        default_factory=CollectOptions,
        metadata={"prefix": "collect_", "help": "collection of missing stores (flags --collect-*)"},
    )
    crosscoder: CrosscoderOptions = field(default_factory=CrosscoderOptions, metadata={"help": "dictionary"})
    # The optimisation fields mirror CLTTrainConfig's: clt.train._fit runs the steps of both.
    batch_size: int = field(default=1024, metadata={"help": "tokens per step (per process)"})
    train_tokens: int = field(default=1_000_000, metadata={"help": "tokens to train on"})
    max_steps: int | None = field(default=None, metadata={"help": "steps; overrides train_tokens"})
    lr: float = field(default=1e-3, metadata={"help": "peak Adam learning rate"})
    warmup_steps: int = field(default=100, metadata={"help": "lr warm-up steps"})
    sparsity_coefficient: float = field(
        default=0.0, metadata={"help": "λ of the tanh sparsity penalty (0 for TopK / BatchTopK)"}
    )
    lambda_warmup_frac: float = field(default=0.7, metadata={"help": "share of training over which λ ramps"})
    tanh_scale: float = field(default=4.0, metadata={"help": "c in tanh(c·a·Σ_m‖W_dec^m‖)"})
    preact_coefficient: float = field(
        default=3e-3, metadata={"help": "μ of the JumpReLU pre-activation term"}
    )
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    target_l0: float | None = field(default=None, metadata={"help": "stop at this mean L0 (after λ warm-up)"})
    sparse_decode: str = field(default="false", metadata={"help": "unused by crosscoders (dense decode)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the loss (one process only)"})
    dead_window_tokens: int = field(default=250_000, metadata={"help": "silent this long = dead"})
    eval_shards: int = field(default=1, metadata={"help": "shards held out for evaluation"})
    log_every: int = field(default=20, metadata={"help": "steps between metric records"})
    ckpt_every: int = field(default=200, metadata={"help": "steps between checkpoints"})
    seed: int = field(default=0, metadata={"help": "init and data-order seed"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda"})


def paired_store(config: CrosscoderTrainConfig, world=None) -> PairedStore:
    if not (config.model_a and config.model_b and config.store_a and config.store_b):
        raise UserError("give --model-a, --model-b, --store-a and --store-b")
    stores = []
    for model_dir, url in ((config.model_a, config.store_a), (config.model_b, config.store_b)):
        try:
            store = ActivationStore(url)
            if not store.is_complete():
                raise StoreNotFound(url)
        except (StoreNotFound, FileNotFoundError):
            store = collect_activations(
                CollectConfig(
                    **asdict(config.collect),
                    model_dir=model_dir,
                    store=url,
                    corpus_dir=config.corpus_dir,
                    seed=config.seed,
                    device=config.device,
                ),
                world,
            )
        store.check_model(model_dir)
        stores.append(store)
    layers = [l if l >= 0 else stores[0].n_layers + l for l in config.layers]
    return PairedStore(stores[0], stores[1], config.site, layers)


def train_crosscoder(config: CrosscoderTrainConfig) -> dict:
    from clt.train import _fit

    world, device, run, finished = start_run(config)
    if finished is not None:
        return finished
    paired = paired_store(config, world)
    done = paired.done_shards
    if len(done) <= config.eval_shards:
        raise UserError(
            f"the stores have {len(done)} shards: need more than --eval-shards {config.eval_shards}"
        )
    eval_shards, train_shards = done[-config.eval_shards :], done[: -config.eval_shards]
    loader = StoreLoader(
        paired,
        config.batch_size,
        seed=config.seed,
        shards=train_shards,
        rank=world.rank,
        world_size=world.world_size,
    )
    torch.manual_seed(config.seed)
    crosscoder = Crosscoder(
        CrosscoderConfig(
            **asdict(config.crosscoder), n_models=2, n_sites=len(paired.layers), d_model=paired.d_model
        )
    ).to(device)
    if config.crosscoder.activation != "jumprelu":
        crosscoder.log_threshold.requires_grad_(False)
    scales = torch.tensor(paired.norm_scales())
    crosscoder.input_scale.copy_(scales)
    crosscoder.output_scale.copy_(scales)
    total_steps = config.max_steps or max(1, config.train_tokens // (config.batch_size * world.world_size))
    optimizer = torch.optim.Adam([p for p in crosscoder.parameters() if p.requires_grad], lr=config.lr)
    fresh = find_checkpoint(run.path) is None
    state = resume(
        run,
        crosscoder,
        optimizer,
        world,
        initial={"epoch": 0, "batch_in_epoch": 0, "stopped_early": False, "tokens_since_fired": None},
    )
    if fresh:
        x0, _ = next(iter(loader.epoch(0)))
        x0 = x0.to(device) * crosscoder.input_scale[None, :, None]
        crosscoder.initialize_from_batch(x0, x0)
    tokens_since_fired = (
        torch.zeros(1, config.crosscoder.n_features, dtype=torch.long)
        if state["tokens_since_fired"] is None
        else torch.tensor(state["tokens_since_fired"], dtype=torch.long)
    )
    _fit(config, crosscoder, optimizer, loader, state, tokens_since_fired, total_steps, run, world, device)
    world.shutdown()
    if not world.is_main:
        return {}
    crosscoder.eval()
    save_crosscoder(
        crosscoder,
        run.path / "crosscoder",
        {"model_a": config.model_a, "model_b": config.model_b, "site": config.site, "layers": paired.layers},
    )
    summary = {
        "run_dir": str(run.path),
        "steps": state["step"],
        "tokens": state["tokens"],
        "train_time_s": state["train_time_s"],
        "dead_fraction": float((tokens_since_fired >= config.dead_window_tokens).float().mean()),
        "heldout": evaluate_crosscoder(crosscoder, paired, eval_shards),
    }
    atomic_write_json(run.path / "summary.json", summary)
    return summary


@torch.no_grad()
def evaluate_crosscoder(
    crosscoder: Crosscoder, paired: PairedStore, shards: list[int], batch_size: int = 2048, top: int = 20
) -> dict:
    """Held-out FVU per model × site, L0, never-active and dense latents, the relative-norm histogram and
    counts, per-language activation frequency of the model-specific latents, and their latent scaling."""
    device = crosscoder.b_dec.device
    n, F = crosscoder.config.n_inputs, crosscoder.config.n_features
    residual, sum_x, sum_x2 = (
        torch.zeros(n, dtype=torch.float64),
        torch.zeros(n, crosscoder.config.d_model, dtype=torch.float64),
        torch.zeros(n, dtype=torch.float64),
    )
    fired = torch.zeros(F, dtype=torch.float64)
    fired_by_lang = torch.zeros(len(paired.langs), F, dtype=torch.float64)
    tokens_by_lang = torch.zeros(len(paired.langs), dtype=torch.float64)
    l0, count, sample = 0.0, 0, []
    for shard in shards:
        data = paired.read_shard(shard, ("mlp_in", "lang"))
        for start in range(0, len(data["lang"]), batch_size):
            x = torch.from_numpy(data["mlp_in"][start : start + batch_size]).float().to(device)
            x = x * crosscoder.input_scale[None, :, None]
            x_hat, acts, _ = crosscoder(x)
            on = (acts[:, 0] > 0).double().cpu()
            residual += (x - x_hat).double().pow(2).sum(dim=(0, 2)).cpu()
            sum_x += x.double().sum(0).cpu()
            sum_x2 += x.double().pow(2).sum(dim=(0, 2)).cpu()
            fired += on.sum(0)
            langs = torch.from_numpy(data["lang"][start : start + batch_size].astype("int64"))
            fired_by_lang.index_add_(0, langs, on)
            tokens_by_lang += torch.bincount(langs, minlength=len(paired.langs)).double()
            l0 += float(on.sum())
            count += len(x)
            if len(sample) < 4:
                sample.append(x)
    variance = sum_x2 - sum_x.pow(2).sum(-1) / count
    relative = crosscoder.relative_norms().detach().cpu()
    frequency = fired / count
    counts = classify_latents(relative, frequency > 0)
    b_only = [
        int(i) for i in torch.argsort(relative, descending=True) if relative[i] > 0.9 and frequency[i] > 0
    ][:top]
    a_only = [int(i) for i in torch.argsort(relative) if relative[i] < 0.1 and frequency[i] > 0][:top]
    batch = torch.cat(sample)
    by_lang = fired_by_lang / tokens_by_lang.clamp(min=1)[:, None]
    return {
        "fvu_per_input": (residual / variance).tolist(),  # A's sites, then B's
        "mean_l0": l0 / count,
        "never_active_fraction": float((frequency == 0).double().mean()),
        "dense_fraction": float((frequency > 0.5).double().mean()),
        "relative_norm_histogram": torch.histc(relative, bins=20, min=0, max=1).tolist(),
        "latent_counts": counts,
        "b_only": [
            {
                "latent": j,
                "relative_norm": float(relative[j]),
                "frequency": float(frequency[j]),
                "frequency_by_lang": dict(zip(paired.langs, by_lang[:, j].tolist())),
            }
            for j in b_only
        ],
        "a_only": [
            {
                "latent": j,
                "relative_norm": float(relative[j]),
                "frequency": float(frequency[j]),
                "frequency_by_lang": dict(zip(paired.langs, by_lang[:, j].tolist())),
            }
            for j in a_only
        ],
        "latent_scaling_b_only": {str(j): v for j, v in latent_scaling(crosscoder, batch, b_only).items()},
        "tokens": count,
    }


def save_crosscoder(crosscoder: Crosscoder, out_dir: Path, metadata: dict) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in crosscoder.state_dict().items()}, str(out_dir / WEIGHTS)
    )
    atomic_write_json(out_dir / CONFIG, {"crosscoder": crosscoder.config.to_dict(), **metadata})
    return out_dir


def load_crosscoder(path: str | Path) -> Crosscoder:
    """A saved crosscoder: its directory, or the run directory of scripts/train_crosscoder.py."""
    path = Path(path)
    if not (path / WEIGHTS).exists() and (path / "crosscoder" / WEIGHTS).exists():
        path = path / "crosscoder"  # (the run directory was given)
    if not (path / WEIGHTS).exists():
        raise UserError(f"no crosscoder at {path}: train one with scripts/train_crosscoder.py")
    config = json.loads((path / CONFIG).read_text())["crosscoder"]
    crosscoder = Crosscoder(CrosscoderConfig(**config))
    crosscoder.load_state_dict(load_file(str(path / WEIGHTS)))
    return crosscoder.eval()
