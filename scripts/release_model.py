"""Release a base model, its CLT and its located units as models/<name>/ (fp16, with MANIFEST.json).

    python scripts/release_model.py --name base-balanced --pretrain-run runs/base-balanced \
        --clt-run runs/clt-base-balanced --locate-run runs/locate-base-balanced --corpus-dir data/corpus-all

The logic is `training.release.release`; every later load of a released file checks the manifest.
"""

from training.config import parse_config, run_main
from training.release import ReleaseConfig, release


def main(argv: list[str]) -> None:
    print(release(parse_config(ReleaseConfig, argv)))


if __name__ == "__main__":
    run_main(main)
