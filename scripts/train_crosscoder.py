"""Train a crosscoder on two models' activations at one site (model diffing; clt/crosscoder.py).

    python scripts/train_crosscoder.py --model-a runs/pretrain-tiny-en-heavy/model \
        --model-b runs/finetune/adapt-eu-full-0/model --store-a runs/activations/a.zarr \
        --store-b runs/activations/b.zarr --layers -1 --run-dir runs/crosscoder-eu-full

Both stores are collected if missing, with the same settings (so the same tokens; checked token for
token). Prints held-out FVU per model and site, L0, and the counts of before-only / after-only /
shared latents by relative decoder norm; summary.json has the histogram, the model-specific latents'
language frequencies and their latent scaling (ν). The logic is `clt.crosscoder_train`.
"""

import json

from clt.crosscoder_train import CrosscoderTrainConfig, train_crosscoder
from training.config import parse_config, run_main


def main(argv: list[str]) -> None:
    summary = train_crosscoder(parse_config(CrosscoderTrainConfig, argv))
    held = summary.get("heldout", {})
    print(
        json.dumps(
            {k: held.get(k) for k in ("fvu_per_input", "mean_l0", "never_active_fraction", "latent_counts")},
            indent=1,
        )
    )


if __name__ == "__main__":
    run_main(main)
