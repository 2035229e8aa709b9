"""Hyper-parameter sweeps as plain data: trials are lists of ``key=value`` config overrides.

Pure functions (no MLflow, no training): parse ``--grid KEY=V1,V2`` and ``--range KEY=LO:HI[:log]``,
expand a grid (every combination, in the order given) or draw a seeded random search, and pick
the best finished trial by a metric. ``jobs/sweep.py`` runs the trials.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pipelines.config import ConfigError


@dataclass(frozen=True)
class Range:
    """A numeric range for random search: ints when both ends are ints, log-uniform when ``log``."""

    low: float
    high: float
    log: bool = False
    integer: bool = False

    def draw(self, rng: random.Random) -> int | float:
        """One value drawn from ``rng``: uniform, or log-uniform when ``log``; rounded to an int when
        ``integer``."""
        if self.log:
            v = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            v = rng.uniform(self.low, self.high)
        return int(round(v)) if self.integer else v


def split_values(raw: str) -> list[str]:
    """``"a,b,[1,2],c"`` -> ``["a", "b", "[1,2]", "c"]``: commas inside brackets stay put."""
    out, depth, cur = [], 0, []
    for ch in raw:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur).strip())
    if depth != 0 or any(v == "" for v in out):
        raise ConfigError(f"sweep values {raw!r}: unbalanced brackets or an empty value")
    return out


def _key_value(item: str, flag: str) -> tuple[str, str]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip() or not raw.strip():
        raise ConfigError(f"{flag} {item!r}: expected dotted.key=VALUES, e.g. {flag} pretrain.method=rbm,none")
    return key.strip(), raw.strip()


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["pretrain.method=rbm,none", "model.layers=[784,256,2]"]`` -> key -> raw values (YAML text)."""
    out: dict[str, list[str]] = {}
    for item in items:
        key, raw = _key_value(item, "--grid")
        if key in out:
            raise ConfigError(f"--grid {key}: given twice")
        out[key] = split_values(raw)
    return out


def parse_ranges(items: Sequence[str]) -> dict[str, Range]:
    """``["finetune.lr=0.001:0.1:log", "finetune.epochs=2:8"]`` -> key -> Range."""
    out: dict[str, Range] = {}
    for item in items:
        key, raw = _key_value(item, "--range")
        parts = raw.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("log", "lin")):
            raise ConfigError(f"--range {item!r}: expected KEY=LOW:HIGH or KEY=LOW:HIGH:log")
        try:
            low, high = float(parts[0]), float(parts[1])
        except ValueError:
            raise ConfigError(f"--range {item!r}: LOW and HIGH must be numbers") from None
        log = len(parts) == 3 and parts[2] == "log"
        if not low < high or (log and low <= 0):
            raise ConfigError(f"--range {item!r}: need LOW < HIGH (and LOW > 0 for log)")
        integer = all(p.strip().lstrip("+-").isdigit() for p in parts[:2])
        out[key] = Range(low, high, log, integer)
    return out


def _fmt(v: object) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def grid_trials(grid: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """Every combination, the last key varying fastest."""
    if not grid:
        return [[]]
    keys = list(grid)
    return [[f"{k}={v}" for k, v in zip(keys, combo, strict=True)] for combo in itertools.product(*grid.values())]


def random_trials(
    n: int, choices: Mapping[str, Sequence[str]], ranges: Mapping[str, Range], seed: int
) -> list[list[str]]:
    """``n`` trials, each key drawn independently (choices uniformly, ranges as declared); seeded."""
    if n < 1:
        raise ConfigError(f"--random: need at least 1 trial, got {n}")
    both = set(choices) & set(ranges)
    if both:
        raise ConfigError(f"sweep key {sorted(both)[0]!r}: given both as --grid choices and as --range")
    rng = random.Random(seed)
    trials = []
    for _ in range(n):
        t = [f"{k}={rng.choice(list(v))}" for k, v in choices.items()]
        t += [f"{k}={_fmt(r.draw(rng))}" for k, r in ranges.items()]
        trials.append(t)
    return trials


def best_trial(scores: Sequence[float | None], mode: Literal["min", "max"]) -> int | None:
    """Index of the best finite score (first on ties), or None when no trial produced one."""
    finite = [(s, i) for i, s in enumerate(scores) if s is not None and math.isfinite(s)]
    if not finite:
        return None
    if mode == "max":
        return max(finite, key=lambda p: (p[0], -p[1]))[1]
    return min(finite, key=lambda p: (p[0], p[1]))[1]
