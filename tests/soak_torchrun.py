"""Soak the multi-process tests: run the four torchrun tests N times under CPU load, count hangs.

    python tests/soak_torchrun.py --repeats 30 --busy 2

Each round runs the four tests in one pytest process (a hang fails the test through run_torchrun's
timeout and dumps every rank's stack); after each round, no process of a project script may survive.
`--busy` starts that many CPU-bound processes for the whole soak, as a loaded CI machine would have.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = [
    "tests/test_clt_train.py::test_ddp_training_with_torchrun_matches_one_process",
    "tests/test_activations.py::test_two_torchrun_writers_fill_disjoint_shards_identically",
    "tests/test_pretrain.py::test_ddp_two_processes_match_gradient_accumulation",
    "tests/test_finetune.py::test_masked_finetuning_under_torchrun",
]


def leftover_processes() -> list[str]:
    listing = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    # Only this checkout's scripts: other jobs on the machine may run the project's scripts too.
    ours = str(REPO / "scripts")
    return [line for line in listing if ours in line]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--busy", type=int, default=2)
    args = parser.parse_args()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    failures, leftovers = 0, 0
    try:
        for round_ in range(1, args.repeats + 1):
            start = time.time()
            result = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
                cwd=REPO,
                capture_output=True,
                text=True,
            )
            left = leftover_processes()
            failures += result.returncode != 0
            leftovers += bool(left)
            summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "(no output)"
            print(
                f"round {round_}: {summary} in {time.time() - start:.0f} s; leftover processes: {len(left)}",
                flush=True,
            )
            if result.returncode != 0:
                print(result.stdout[-6000:], flush=True)
            if left:
                print("\n".join(left), flush=True)
    finally:
        for process in busy:
            process.kill()
    print(
        f"{args.repeats} rounds × {len(TESTS)} tests: {failures} failed rounds, {leftovers} rounds with "
        "leftovers"
    )
    sys.exit(1 if failures or leftovers else 0)


if __name__ == "__main__":
    main()
