"""Train a cross-layer transcoder on stored (or streamed) activations.

Adam with linear warm-up, λ (sparsity) warm-up over `lambda_warmup_frac` of training, gradient clipping,
optional stop at a target mean L0, dead-feature tracking, checkpoint + resume with identical final
weights, tqdm progress, JSONL metrics and DDP under torchrun (each rank reads its own shards).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from clt.activations import CollectConfig, CollectOptions, bos_blocks, collect_activations, collection_blocks
from clt.evaluate import replacement_metrics, store_metrics
from clt.export import save_native
from clt.loader import RankUnionLoader, StoreLoader, StreamingLoader
from clt.loss import clt_loss, fraction_of_variance_unexplained
from clt.model import CLTConfig, CLTOptions, CrossLayerTranscoder
from clt.store import ActivationStore
from training import paths
from training.checkpoint import find_checkpoint, save_checkpoint
from training.config import RunDir, atomic_write_json
from training.errors import UserError
from training.loop import StepResult, resume, run_steps, start_run, warmup_factor
from training.models import load_model


@dataclass
class CLTTrainConfig:
    """Train a cross-layer transcoder (or per-layer transcoder) on a GPT-2 model's MLP activations."""

    run_dir: str = field(
        default=paths.CLT_RUN_DIR, metadata={"help": "run directory (resumed if it holds a checkpoint)"}
    )
    model_dir: str = field(default=paths.MODEL_DIR, metadata={"help": "HF GPT-2 model directory"})
    store: str = field(default=paths.STORE, metadata={"help": "activation store (collected if missing)"})
    emulate_ranks: int = field(
        default=1,
        metadata={
            "help": "train one process on the union of this many data-parallel ranks' batches "
            "(reproduces a torchrun run of that many ranks)"
        },
    )
    streaming: bool = field(
        default=False, metadata={"help": "train straight from the model, without a store"}
    )
    corpus_dir: str | None = field(
        default=None, metadata={"help": "corpus for collection and evaluation (default corpus if unset)"}
    )
    collect: CollectOptions = field(
        default_factory=CollectOptions,
        metadata={"prefix": "collect_", "help": "collection of a missing store (flags --collect-*)"},
    )
    clt: CLTOptions = field(default_factory=CLTOptions, metadata={"help": "the transcoder's options"})
    init_from: str = field(
        default="",
        metadata={
            "help": "warm start: continue training this CLT (native dir; its options and normalisation "
            "scales are kept, so feature i stays feature i) on this model's activations — model diffing; "
            "give --lambda-warmup-frac 0 to continue at full λ (a ramp from 0 lets the features densify)"
        },
    )
    batch_size: int = field(default=1024, metadata={"help": "tokens per step (per process)"})
    train_tokens: int = field(
        default=1_000_000, metadata={"help": "tokens to train on (epochs over the store)"}
    )
    max_steps: int | None = field(default=None, metadata={"help": "steps; overrides train_tokens"})
    lr: float = field(default=1e-3, metadata={"help": "peak Adam learning rate"})
    warmup_steps: int = field(default=100, metadata={"help": "lr warm-up steps"})
    sparsity_coefficient: float = field(
        default=1.0,
        metadata={
            "help": "λ of the tanh sparsity penalty (final value; 1.0 gives mean L0 ≈ 10 on the tiny models)"
        },
    )
    lambda_warmup_frac: float = field(
        default=0.7, metadata={"help": "share of training over which λ ramps up linearly"}
    )
    tanh_scale: float = field(default=4.0, metadata={"help": "c in tanh(c·a·‖W_dec‖)"})
    preact_coefficient: float = field(
        default=3e-3,
        metadata={
            "help": "μ of the pre-activation (dead feature) term; 3e-3 keeps never-active features ≤ 5% per "
            "layer at unchanged FVU and KL, 3e-6 (before 2026-12) left 60-92% (docs/clt.md)"
        },
    )
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    target_l0: float | None = field(
        default=None, metadata={"help": "stop once the mean L0 per layer falls to this (after λ warm-up)"}
    )
    sparse_decode: str = field(
        default="auto", metadata={"help": "auto, true (gather active decoder rows) or false (dense)"}
    )
    compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile the loss (fuses its elementwise passes over batch × layer × feature): "
            "1.06× (JumpReLU) to 1.19× (TopK) faster steps at 2,048 features on 2 idle CPU cores after "
            "≈ 10 s of compilation; equal to eager up to float rounding (docs/performance.md §5). One "
            "process only"
        },
    )
    dead_window_tokens: int = field(
        default=250_000,
        metadata={
            "help": "a feature is dead if silent for this many training tokens (keep it below the run length)"
        },
    )
    eval_shards: int = field(default=1, metadata={"help": "store shards held out for evaluation"})
    eval_blocks: int = field(
        default=32, metadata={"help": "validation blocks per language for the replacement-model metrics"}
    )
    log_every: int = field(default=20, metadata={"help": "steps between metric records"})
    ckpt_every: int = field(default=200, metadata={"help": "steps between checkpoints"})
    seed: int = field(default=0, metadata={"help": "seed for init and data order"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda"})


def sparse_flag(value: str) -> bool | None:
    return {"auto": None, "true": True, "false": False}[value.lower()]


def ensure_store(config: CLTTrainConfig, world) -> ActivationStore:
    collect = CollectConfig(
        **asdict(config.collect),
        model_dir=config.model_dir,
        store=config.store,
        corpus_dir=config.corpus_dir,
        seed=config.seed,
        device=config.device,
    )
    try:
        store = ActivationStore(config.store)
        if store.is_complete():
            return store
    except FileNotFoundError:
        pass
    return collect_activations(collect, world)


def build_clt(config: CLTTrainConfig, n_layers: int, d_model: int) -> CrossLayerTranscoder:
    clt_config = CLTConfig.for_model(config.clt, n_layers, d_model)
    torch.manual_seed(config.seed)
    clt = CrossLayerTranscoder(clt_config)
    if config.clt.activation != "jumprelu":
        clt.log_threshold.requires_grad_(False)  # unused: keep it out of the optimizer and of DDP's reducer
    return clt


def warm_start(config: CLTTrainConfig, clt: CrossLayerTranscoder) -> bool:
    """Load `config.init_from` into `clt` (weights and scales) when starting fresh; its options must
    equal the run's, so the loaded features are the ones trained on."""
    from clt.export import load_native

    base, _ = load_native(config.init_from)
    if base.config != clt.config:
        raise UserError(
            f"--init-from {config.init_from} is a {base.config.n_features}-feature {base.config.activation} "
            f"transcoder for {base.config.n_layers} × {base.config.d_model}; this run asks for "
            f"{clt.config.n_features}-feature {clt.config.activation} for {clt.config.n_layers} × "
            f"{clt.config.d_model}: give the same --n-features / --activation / ..."
        )
    with torch.no_grad():
        clt.load_state_dict(base.state_dict())
    return True


def evaluation_blocks(
    corpus_dir: str | None, tokenizer, langs: list[str], n_ctx: int, per_lang: int
) -> tuple[torch.Tensor, list[str]]:
    """Held-out validation blocks (BOS + text), up to `per_lang` per language."""
    from training.corpus.build import default_corpus_dir, load_corpus

    validation = load_corpus(corpus_dir or default_corpus_dir())["validation"]
    keep = [(t, l) for t, l in zip(validation["text"], validation["lang"]) if l in set(langs)]
    ids = tokenizer([t for t, _ in keep], add_special_tokens=False)["input_ids"]
    blocks, block_langs = bos_blocks(ids, [l for _, l in keep], tokenizer, n_ctx)
    chosen = [i for lang in langs for i in [j for j, l in enumerate(block_langs) if l == lang][:per_lang]]
    return blocks[chosen], [block_langs[i] for i in chosen]


def train_clt(config: CLTTrainConfig) -> dict:
    world, device, run, finished = start_run(config)
    if finished is not None:
        return finished

    model, tokenizer = load_model(config.model_dir, device)
    n_layers, d_model = model.config.n_layer, model.config.n_embd
    clt = build_clt(config, n_layers, d_model).to(device)

    if config.streaming:
        from training.corpus.build import default_corpus_dir, load_corpus
        from training.mixtures import parse_mixture

        train_split = load_corpus(config.corpus_dir or default_corpus_dir())["train"]
        blocks, _ = collection_blocks(
            tokenizer,
            list(train_split["text"]),
            list(train_split["lang"]),
            parse_mixture(config.collect.mixture),
            config.collect.n_tokens,
            config.collect.n_ctx,
            config.seed,
        )
        blocks = blocks[world.rank :: world.world_size]
        loader = StreamingLoader(
            model, blocks, config.batch_size, seed=config.seed + world.rank, device=device
        )
        scales = _streaming_scales(loader)
        store, eval_shards, langs = None, [], sorted(parse_mixture(config.collect.mixture))
    else:
        store = ensure_store(config, world)
        store.check_model(config.model_dir)
        done = store.done_shards
        if len(done) <= config.eval_shards:
            raise ValueError(
                f"the store has {len(done)} shards: need more than eval_shards={config.eval_shards}"
            )
        eval_shards, train_shards = done[-config.eval_shards :], done[: -config.eval_shards]
        if config.emulate_ranks > 1 and world.world_size > 1:
            raise UserError(
                "--emulate-ranks reproduces a torchrun run on one process: do not use it under torchrun"
            )
        # Each rank reads its own shards; an emulated run reads every rank's and trains on their union.
        data_world = config.emulate_ranks if config.emulate_ranks > 1 else world.world_size
        data_ranks = range(config.emulate_ranks) if config.emulate_ranks > 1 else [world.rank]
        loaders = [
            StoreLoader(
                store, config.batch_size, seed=config.seed, shards=train_shards, rank=r, world_size=data_world
            )
            for r in data_ranks
        ]
        loader = loaders[0] if len(loaders) == 1 else RankUnionLoader(loaders)
        scales = store.norm_scales()
        langs = store.langs
    clt.input_scale.copy_(torch.tensor(scales[0]))
    clt.output_scale.copy_(torch.tensor(scales[1]))
    warm = warm_start(config, clt) if config.init_from else False

    total_steps = config.max_steps or max(1, config.train_tokens // (config.batch_size * world.world_size))
    optimizer = torch.optim.Adam(
        [p for p in clt.parameters() if p.requires_grad], lr=config.lr, betas=(0.9, 0.999)
    )
    fresh = find_checkpoint(run.path) is None
    state = resume(
        run,
        clt,
        optimizer,
        world,
        initial={"epoch": 0, "batch_in_epoch": 0, "stopped_early": False, "tokens_since_fired": None},
    )
    if fresh and not warm:
        # Under DDP every rank starts from rank 0's initialisation (the wrapper broadcasts it).
        first = loader.loaders[0] if isinstance(loader, RankUnionLoader) else loader
        x0, y0 = next(iter(first.epoch(0)))
        clt.initialize_from_batch(
            _scaled(x0.to(device), clt.input_scale), _scaled(y0.to(device), clt.output_scale)
        )
    tokens_since_fired = (
        torch.zeros(n_layers, config.clt.n_features, dtype=torch.long)
        if state["tokens_since_fired"] is None
        else torch.tensor(state["tokens_since_fired"], dtype=torch.long)
    )
    _fit(config, clt, optimizer, loader, state, tokens_since_fired, total_steps, run, world, device)
    world.shutdown()  # after _fit returned: its DDP wrapper is gone (see training.loop.release_data_parallel)

    summary = {}
    if world.is_main:
        summary = finish(
            config, run, model, tokenizer, clt, store, eval_shards, langs, state, tokens_since_fired, device
        )
    return summary


def _fit(
    config: CLTTrainConfig,
    clt,
    optimizer,
    loader,
    state: dict,
    tokens_since_fired: torch.Tensor,
    total_steps: int,
    run: RunDir,
    world,
    device,
) -> None:
    """The optimizer steps (the shared loop, training.loop.run_steps); the DDP wrapper lives only in here."""
    if config.compile and world.world_size > 1:
        raise UserError("--compile is supported in one process only: drop it under torchrun")
    trained = torch.nn.parallel.DistributedDataParallel(clt) if world.world_size > 1 else clt
    # Most of a step is elementwise passes over the [batch, layer, feature] activations (JumpReLU, the
    # tanh sparsity and pre-activation terms, their backward), not the matmuls; compiling fuses them.
    loss_fn = torch.compile(clt_loss) if config.compile else clt_loss
    batches = _batch_stream(loader, state)
    lambda_steps = max(1, int(config.lambda_warmup_frac * total_steps))

    def one_step(step: int) -> StepResult:
        x, y = next(batches)
        x, y = _scaled(x.to(device), clt.input_scale), _scaled(y.to(device), clt.output_scale)
        lr = config.lr * warmup_factor(step, config.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sparsity = config.sparsity_coefficient * min(1.0, (step + 1) / lambda_steps)
        terms = loss_fn(
            clt,
            x,
            y,
            sparsity,
            config.preact_coefficient,
            config.tanh_scale,
            sparse_flag(config.sparse_decode),
            forward=trained,
        )
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        torch.nn.utils.clip_grad_norm_(clt.parameters(), config.grad_clip)
        optimizer.step()
        fired = (terms.acts > 0).any(0).cpu()
        tokens_since_fired.add_(x.shape[0])
        tokens_since_fired[fired] = 0
        mean_l0 = (terms.acts > 0).float().sum(-1).mean().item()
        stop = config.target_l0 is not None and step + 1 >= lambda_steps and mean_l0 <= config.target_l0
        state["stopped_early"] = state["stopped_early"] or stop

        def record() -> dict:
            return {
                "loss": terms.total.item(),
                "mse": terms.reconstruction.item(),
                "sparsity": terms.sparsity.item(),
                "preact": terms.preactivation.item(),
                "lambda": sparsity,
                "lr": lr,
                "l0_per_layer": (terms.acts > 0).float().sum(-1).mean(0).tolist(),
                "mean_l0": mean_l0,
                "fvu_per_layer": fraction_of_variance_unexplained(y, terms.reconstruction_out).tolist(),
                "dead_fraction": (tokens_since_fired >= config.dead_window_tokens).float().mean().item(),
            }

        return StepResult(
            x.shape[0] * world.world_size,
            record,
            stop=stop,
            postfix=lambda r: {"mse": f"{r['mse']:.3f}", "l0": f"{r['mean_l0']:.1f}"},
        )

    def checkpoint(state: dict) -> None:
        state["tokens_since_fired"] = tokens_since_fired.tolist()
        if world.is_main:
            save_checkpoint(run.path, clt, optimizer, state)

    clt.train()
    run_steps(
        state, total_steps, one_step, world, run, config.log_every, config.ckpt_every, checkpoint, "train CLT"
    )


def _scaled(activations: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return activations * scale[None, :, None]


def _batch_stream(loader, state: dict):
    """Endless batches that keep `state['epoch']`/`state['batch_in_epoch']` current for exact resume."""
    while True:
        iterator = (
            loader.epoch(state["epoch"], skip_batches=state["batch_in_epoch"])
            if isinstance(loader, (StoreLoader, RankUnionLoader))
            else loader.epoch(state["epoch"])
        )
        for batch in iterator:
            state["batch_in_epoch"] += 1
            yield batch
        state["epoch"] += 1
        state["batch_in_epoch"] = 0


def _streaming_scales(loader: StreamingLoader) -> tuple[list[float], list[float]]:
    x, y = next(iter(loader.epoch(10**6)))  # an epoch index training never reaches: its own sample
    root_d = x.shape[-1] ** 0.5
    return (root_d / x.norm(dim=-1).mean(0)).tolist(), (root_d / y.norm(dim=-1).mean(0)).tolist()


def finish(
    config: CLTTrainConfig,
    run: RunDir,
    model,
    tokenizer,
    clt,
    store,
    eval_shards,
    langs,
    state,
    tokens_since_fired,
    device,
) -> dict:
    from training.fingerprint import model_fingerprint

    clt.eval()
    native_dir = run.path / "clt"
    save_native(
        clt,
        native_dir,
        {
            "model_dir": config.model_dir,
            "model_sha256": model_fingerprint(config.model_dir),
            "store": None if config.streaming else config.store,
        },
    )
    report = {
        "run_dir": str(run.path),
        "steps": state["step"],
        "tokens": state["tokens"],
        "train_time_s": state["train_time_s"],
        "stopped_early": state["stopped_early"],
        "train_tokens_per_s": state["tokens"] / max(state["train_time_s"], 1e-9),
        "dead_fraction_per_layer": (tokens_since_fired >= config.dead_window_tokens).float().mean(1).tolist(),
        "dead_window_tokens": config.dead_window_tokens,
    }
    if store is not None:
        report["heldout"] = store_metrics(clt, store, eval_shards)
    blocks, block_langs = evaluation_blocks(
        config.corpus_dir, tokenizer, langs, config.collect.n_ctx, config.eval_blocks
    )
    report["replacement"] = replacement_metrics(model, clt, blocks.to(device), block_langs)
    atomic_write_json(run.path / "summary.json", report)
    return report


def format_summary(report: dict) -> str:
    """Human-readable per-layer table printed at the end of training and by eval_clt."""
    lines = []
    held = report.get("heldout", {}).get("all")
    if held:
        lines.append("layer  FVU     L0      never-active")
        for layer, (fvu, l0, dead) in enumerate(zip(held["fvu"], held["l0"], held["never_active_fraction"])):
            lines.append(f"{layer:>5}  {fvu:.4f}  {l0:6.1f}  {dead:.3f}")
    if "dead_fraction_per_layer" in report:
        lines.append(
            "dead during training (per layer): "
            + ", ".join(f"{d:.3f}" for d in report["dead_fraction_per_layer"])
        )
    replacement = report.get("replacement", {})
    if replacement:
        lines.append("replacement model vs real (per language):  KL      ΔCE     top-1 agree")
        for lang, values in sorted(replacement.items(), key=lambda kv: (kv[0] != "all", kv[0])):
            lines.append(
                f"  {lang:>5}  {values['kl']:.4f}  {values['delta_ce']:+.4f}  {values['top1_agreement']:.3f}"
            )
    return "\n".join(lines)
