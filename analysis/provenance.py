"""Numbers that remember where they came from: a report built from these holds no literals.

`read(file, pointer)` takes one number out of a stage's JSON output (`pointer` is a JSON pointer, e.g.
`/sections/probes/probes/clt_0/test_accuracy`); `derive(op, *inputs)` combines numbers with one of a
few named operations (mean, difference, standard error, Wilson bounds...). `verify` re-reads every
source file and recomputes every derivation, so a test can check that each number in a report is what
the stages wrote.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from training.errors import UserError


@dataclass(frozen=True)
class Measured:
    value: float
    source: str  # a stage's output file
    pointer: str  # JSON pointer into it

    def to_json(self) -> dict:
        return {"value": self.value, "source": self.source, "pointer": self.pointer}


@dataclass(frozen=True)
class Derived:
    value: float
    op: str
    inputs: tuple[Measured | Derived, ...]

    def to_json(self) -> dict:
        return {"value": self.value, "op": self.op, "inputs": [x.to_json() for x in self.inputs]}


Number = Measured | Derived


def _sem(*xs: float) -> float:
    if len(xs) < 2:
        return float("nan")
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def _wilson(p: float, n: float, sign: int) -> float:
    """95% Wilson score bound of a proportion p observed on n trials."""
    z = 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre + sign * half


OPERATIONS = {
    "difference": lambda a, b: a - b,
    "mean": lambda *xs: sum(xs) / len(xs),
    "sem": _sem,
    "quadrature": lambda *xs: math.sqrt(sum(x * x for x in xs)),  # the s.e. of a sum or difference
    "twice": lambda x: 2 * x,  # a 2-standard-error band
    "half": lambda x: x / 2,
    "ratio": lambda a, b: a / b if b else float("nan"),
    # Two standard errors of a / b from the two means and their standard errors (delta method).
    "ratio_band": lambda a, sa, b, sb: (
        2 * abs(a / b) * math.sqrt((sa / a) ** 2 + (sb / b) ** 2) if a and b else float("nan")
    ),
    "max": max,
    "min": min,
    "wilson_low": lambda p, n: _wilson(p, n, -1),
    "wilson_high": lambda p, n: _wilson(p, n, +1),
}


@cache
def _load(source: str, mtime: float) -> object:
    return json.loads(Path(source).read_text())


def _resolve(document: object, pointer: str) -> object:
    value = document
    for part in pointer.strip("/").split("/") if pointer.strip("/") else []:
        part = part.replace("~1", "/").replace("~0", "~")
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def read(source: str | Path, pointer: str) -> Measured:
    """One number of a stage's JSON output."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"{path} is missing: the stage that writes it has not run")
    try:
        value = _resolve(_load(str(path), path.stat().st_mtime), pointer)
    except (KeyError, IndexError, TypeError):
        raise UserError(f"{path} has no {pointer}: was it written by another version of the stage?") from None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise UserError(f"{path}{pointer} is {value!r}, not a number")
    return Measured(float(value), str(path), pointer)


def derive(op: str, *inputs: Number) -> Derived:
    return Derived(float(OPERATIONS[op](*(x.value for x in inputs))), op, tuple(inputs))


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))  # (a stage may write NaN: too few samples)


def verify(number: Number) -> bool:
    """True when the number is what its sources hold now (re-read) and its derivation gives."""
    if isinstance(number, Measured):
        return _same(read(number.source, number.pointer).value, number.value)
    recomputed = OPERATIONS[number.op](*(x.value for x in number.inputs))
    return _same(recomputed, number.value) and all(verify(x) for x in number.inputs)


def leaves(number: Number) -> list[Measured]:
    if isinstance(number, Measured):
        return [number]
    return [leaf for x in number.inputs for leaf in leaves(x)]
