"""Collect MLP input/output activations of a GPT-2 model into a Zarr v3 store (resumable).

python scripts/collect_activations.py --model-dir runs/pretrain-tiny-en-heavy/model --store runs/act.zarr
torchrun --nproc-per-node 2 scripts/collect_activations.py ...   # writers fill disjoint shards
"""

from clt.activations import CollectConfig, collect_activations
from training.config import parse_config, run_main
from training.loop import init_distributed


def main(argv: list[str]) -> None:
    config = parse_config(CollectConfig, argv)
    world, _ = init_distributed(config.device)
    store = collect_activations(config, world)
    world.shutdown()
    if world.is_main:
        print(
            f"{store.url}: {len(store.done_shards)}/{store.n_shards} shards, "
            f"{len(store.done_shards) * store.tokens_per_shard:,} tokens, {store.n_layers} layers × "
            f"{store.d_model}"
        )


if __name__ == "__main__":
    run_main(main)
