"""The one training loop of the project, shared by pretraining and fine-tuning.

Everything a run needs around it lives here too: distributed set-up (torchrun → gloo on CPU, NCCL on
GPUs), the learning-rate schedule, AdamW with GPT-2's decay groups, and the run-directory start that
refuses to resume a directory holding a different config. `train_steps` runs (or resumes) the
optimizer steps: accumulation, clipping, optional bf16 autocast, DDP, JSONL metrics, periodic
validation and atomic checkpoints. Callers decide which parameters train (requires_grad, gradient
hooks) and may pass `after_step`, which runs after every optimizer step (fine-tuning's exact masking).
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from jaxtyping import Int
from tqdm import tqdm

from training import evaluate
from training.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from training.config import RunDir
from training.data import micro_batch_indices
from training.errors import UserError
from training.models import resolve_device


@dataclass
class OptimizerConfig:
    """Optimisation settings shared by every run config that uses `train_steps` (PretrainConfig,
    FinetuneConfig). Batch size, warm-up and evaluation/checkpoint cadence differ between them and are
    declared by each, with its own defaults."""

    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr as a share of the peak"})
    schedule: str = field(default="cosine", metadata={"help": "cosine, or wsd (warmup-stable-decay)"})
    decay_fraction: float = field(default=0.2, metadata={"help": "wsd: share of the steps spent decaying"})
    weight_decay: float = field(
        default=0.1, metadata={"help": "AdamW weight decay (matrices only; masked entries exempt)"}
    )
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip (0 = off)"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast"})
    log_every: int = field(default=10, metadata={"help": "steps between train-loss records"})

    def __post_init__(self):
        if self.schedule not in ("cosine", "wsd"):
            raise UserError(f"unknown --schedule {self.schedule!r}: cosine or wsd")
        if not 0 < self.decay_fraction <= 1:
            raise UserError(f"--decay-fraction must be in (0, 1], got {self.decay_fraction}")


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def shutdown(self) -> None:
        """Leave the process group as soon as the collective part of a run is over.

        Called by every rank right after training, *before* rank 0's single-process evaluation and
        export, so no rank idles inside a collective while rank 0 works and `destroy_process_group`
        runs with all ranks at the same point (destroying at different times is a known hang).
        """
        if self.world_size > 1 and dist.is_initialized():
            release_data_parallel()
            dist.barrier()
            dist.destroy_process_group()


def release_data_parallel() -> None:
    """Make sure no DistributedDataParallel wrapper outlives the process group.

    A DDP wrapper's reducer owns a reference to the gloo process group. If the wrapper is still alive
    when `destroy_process_group()` runs, the group's last reference dies later with the wrapper, and
    gloo's destructor joins worker threads that never finish: the rank hangs at exit (seen in CI, stack
    `~Reducer → ~ProcessGroupGloo → std::thread::join`). Callers drop their wrappers before shutdown;
    this collects reference cycles and refuses to go on if one is still referenced.
    """
    gc.collect()
    alive = [obj for obj in gc.get_objects() if isinstance(obj, torch.nn.parallel.DistributedDataParallel)]
    if alive:
        raise RuntimeError(
            f"{len(alive)} DistributedDataParallel wrapper(s) still referenced at shutdown: "
            "release them (del) before leaving the process group, or the rank hangs at exit"
        )


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda" and device.index is None and world_size > 1:
        device = torch.device(f"cuda:{local_rank}")  # one GPU per rank
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # Processes share the machine's cores; oversubscribing threads slows everything down. (torchrun's
        # own OMP_NUM_THREADS=1 would starve ranks of a many-core machine, so the share is computed here;
        # MLCLT_THREADS_PER_RANK overrides it, e.g. to time per-core scaling.)
        share = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(max(1, int(os.environ.get("MLCLT_THREADS_PER_RANK", share))))
    if world_size > 1 and not dist.is_initialized():
        # A bounded timeout turns a stuck collective into an error instead of a silent 30-minute hang.
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(seconds=int(os.environ.get("MLCLT_DIST_TIMEOUT_S", "600"))),
        )
    return Dist(rank=int(os.environ.get("RANK", "0")), world_size=world_size, local_rank=local_rank), device


def wsd_decay_start(total_steps: int, config) -> int:
    """The first step of a WSD run's decay: where a decay branch forks off a longer run."""
    return total_steps - max(1, round(config.decay_fraction * total_steps))


def learning_rate(step: int, total_steps: int, config) -> float:
    """Linear warm-up to `lr`, then either cosine decay to `min_lr_ratio × lr` at the last step, or
    warmup-stable-decay (`schedule="wsd"`): constant `lr`, then a linear decay to `min_lr_ratio × lr`
    over the last `decay_fraction` of the steps. A WSD run's stable phase is the same whatever the total,
    so a longer run's checkpoint can be decayed to read a shorter budget (Hägele et al. 2024)."""
    if step < config.warmup_steps:
        return config.lr * warmup_factor(step, config.warmup_steps)
    floor = config.min_lr_ratio
    if getattr(config, "schedule", "cosine") == "wsd":
        decay_start = wsd_decay_start(total_steps, config)
        if step < decay_start:
            return config.lr
        progress = (step - decay_start + 1) / max(1, total_steps - decay_start)
        return config.lr * (1 - (1 - floor) * min(progress, 1.0))
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.lr * (floor + (1 - floor) * cosine)


def make_optimizer(model: torch.nn.Module, config) -> torch.optim.AdamW:
    # Decay matrices (incl. embeddings) but not biases and LayerNorm gains, as in GPT-2/nanoGPT.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), foreach=False)


def start_run(
    config, may_change: tuple[str, ...] = ("device",)
) -> tuple[Dist, torch.device, RunDir, dict | None]:
    """Common start of every training run: distributed setup, the run directory, and either the
    summary of a finished run (nothing to do) or a config check + save (new or resumed run)."""
    world, device = init_distributed(config.device)
    # The config is checked also for a finished run: its summary would answer another config.
    run = RunDir.open(config.run_dir, config, may_change=may_change, save=False)
    summary_path = run.path / "summary.json"
    if summary_path.exists():
        return world, device, run, json.loads(summary_path.read_text())
    if world.is_main:
        run.save_config(config)
    return world, device, run, None


def resume(
    run: RunDir,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    world: Dist,
    initial: dict | None = None,
) -> dict:
    """The loop state of a new run (`initial` adds trainer-specific keys), or the checkpoint's (model and
    optimizer restored, metrics past it dropped)."""
    checkpoint = find_checkpoint(run.path)
    if checkpoint is None:
        return {"step": 0, "tokens": 0, "train_time_s": 0.0, "wall_time_s": 0.0, **(initial or {})}
    state = load_checkpoint(checkpoint, model, optimizer)
    if world.is_main:
        run.truncate_metrics(lambda record: record["step"] <= state["step"])
    return state


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up: (step + 1) / warmup_steps, then 1."""
    return min(1.0, (step + 1) / max(1, warmup_steps))


@dataclass
class StepResult:
    """What one optimizer step reports to `run_steps`."""

    tokens: int  # tokens the step processed, over all ranks
    record: Callable[[], dict]  # its metrics, called on every rank only when a record is due (may all-reduce)
    postfix: Callable[[dict], dict] = lambda record: {}  # progress-bar fields from that record
    stop: bool = False  # end training after this step (e.g. a target reached)


def run_steps(
    state: dict,
    total_steps: int,
    step: Callable[[int], StepResult],
    world: Dist,
    run: RunDir,
    log_every: int,
    ckpt_every: int,
    checkpoint: Callable[[dict], None],
    desc: str,
    after_step: Callable[[dict], bool] | None = None,
) -> dict:
    """The optimizer-step loop every trainer shares: progress bar, step/token/time accounting, throughput
    per logging window, JSONL records, periodic checkpoints (and one at the end or on `stop`), resumable
    from `state`.

    `step(i)` performs optimizer step i and returns a `StepResult`. `checkpoint(state)` runs on every
    rank when one is due (the caller writes files on the main rank only); a barrier follows it.
    `after_step(state)` (e.g. periodic validation) runs after each step; if it returns True, the time it
    took is left out of the throughput window.
    """
    progress = tqdm(
        total=total_steps, initial=state["step"], desc=desc, disable=not world.is_main, unit="step"
    )
    window_start, window_tokens = time.perf_counter(), 0
    segment_start = time.perf_counter()
    while state["step"] < total_steps:
        step_start = time.perf_counter()
        result = step(state["step"])
        state["step"] += 1
        state["tokens"] += result.tokens
        state["train_time_s"] += time.perf_counter() - step_start
        window_tokens += result.tokens
        progress.update(1)
        last = state["step"] == total_steps or result.stop
        if state["step"] % log_every == 0 or last:
            record = {
                "step": state["step"],
                "split": "train",
                **result.record(),
                "tokens": state["tokens"],
                "tokens_per_s": window_tokens / max(time.perf_counter() - window_start, 1e-9),
            }
            window_start, window_tokens = time.perf_counter(), 0
            if world.is_main:
                run.log_metrics(record)
                progress.set_postfix(**result.postfix(record), tok_s=f"{record['tokens_per_s']:,.0f}")
        if after_step is not None and after_step(state):
            window_start = time.perf_counter()  # evaluation time is not training throughput
        if state["step"] % ckpt_every == 0 or last:
            state["wall_time_s"] = state.get("wall_time_s", 0.0) + time.perf_counter() - segment_start
            segment_start = time.perf_counter()
            checkpoint(state)
            world.barrier()
        if result.stop:
            break
    progress.close()
    return state


def train_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_blocks: Int[torch.Tensor, "blocks ctx"],
    val_blocks: dict[str, Int[torch.Tensor, "blocks ctx"]],
    config,
    run: RunDir,
    world: Dist,
    device: torch.device,
    state: dict,
    total_steps: int,
    desc: str = "train",
    after_step: Callable[[], None] | None = None,
    stop_at: int | None = None,
) -> dict:
    """Run language-model optimizer steps `state['step']` … `total_steps` and return the updated `state`.

    `stop_at` pauses earlier (checkpointed, resumable) while the lr schedule still spans `total_steps`:
    how a WSD run is stopped at a decay-branch point.

    `config` provides lr, min_lr_ratio, warmup_steps, micro_batch, grad_accum, grad_clip, bf16, seed,
    log_every, eval_every and ckpt_every (PretrainConfig and FinetuneConfig both do).
    """
    n_ctx = train_blocks.shape[1]
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world.world_size > 1 else model
    tokens_per_step = config.micro_batch * config.grad_accum * world.world_size * n_ctx
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if config.bf16 else nullcontext()

    def one_step(step: int) -> StepResult:
        lr = learning_rate(step, total_steps, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = micro_batch_indices(
            step,
            config.micro_batch,
            config.grad_accum,
            world.rank,
            world.world_size,
            len(train_blocks),
            config.seed,
        )
        step_loss = torch.zeros((), device=device)
        for micro_step, indices in enumerate(micro_batches):
            batch = train_blocks[indices].long().to(device)
            # Skip the gradient all-reduce on all but the last micro-step of an accumulation.
            last_micro = world.world_size == 1 or micro_step == len(micro_batches) - 1
            with nullcontext() if last_micro else ddp_model.no_sync():
                with autocast:
                    loss = ddp_model(input_ids=batch, labels=batch).loss / config.grad_accum
                loss.backward()
            step_loss += loss.detach()
        clip = config.grad_clip > 0
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip) if clip else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()

        def record() -> dict:
            if world.world_size > 1:
                dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
            return {
                "loss": step_loss.item(),
                "lr": lr,
                "grad_norm": None if grad_norm is None else grad_norm.item(),
            }

        return StepResult(tokens_per_step, record, postfix=lambda r: {"loss": f"{r['loss']:.3f}"})

    def validate(state: dict) -> bool:
        if not world.is_main or (state["step"] % config.eval_every and state["step"] != total_steps):
            return False
        with autocast:
            losses = evaluate.loss_per_language(model, val_blocks, config.micro_batch, device)
        run.log_metrics(
            {
                "step": state["step"],
                "split": "validation",
                "tokens": state["tokens"],
                **{f"loss/{lang}": value for lang, value in losses.items()},
            }
        )
        return True

    def checkpoint(state: dict) -> None:
        if world.is_main:
            save_checkpoint(run.path, model, optimizer, state)

    model.train()
    state = run_steps(
        state,
        total_steps if stop_at is None else min(stop_at, total_steps),
        one_step,
        world,
        run,
        config.log_every,
        config.ckpt_every,
        checkpoint,
        desc,
        after_step=validate,
    )
    return state  # ddp_model dies with this frame, before any shutdown (see release_data_parallel)
