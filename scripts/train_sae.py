"""Train a residual-stream SAE with sae-lens on our GPT-2 (the control for CLT-feature steering).

    python scripts/train_sae.py                                   # default model, residual after layer 2
    python scripts/train_sae.py --model-dir runs/tiny-balanced/model --layer 1 --run-dir runs/sae-balanced-l1

Blocks of `[BOS] + 63 tokens` are sampled from the corpus's training split, equally per language, and
fed to sae-lens's own training runner on a TransformerLens copy of the model (interventions/sae.py).
The SAE is saved in sae-lens's format in --run-dir (`SAE.load_from_disk`), with held-out reconstruction
(FVU) and L0 in --run-dir/eval.json. The logic is `interventions.sae.train_sae`.
"""

import json

from interventions.sae import SAEConfig, train_sae
from training.config import parse_config, run_main


def main(argv: list[str]) -> None:
    print(json.dumps(train_sae(parse_config(SAEConfig, argv)), indent=1))


if __name__ == "__main__":
    run_main(main)
