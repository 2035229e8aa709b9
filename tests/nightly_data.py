"""Daily MovieLens tag logs for the nightly tests, in the exact MovieLens formats
(``movies.csv``; ``tags/date=YYYY-MM-DD/tags.csv`` with userId,movieId,tag,timestamp).

Movies belong to one of three genres; each tag belongs to a genre and on a clean day is applied to
that genre's movies. Tag ``i`` is applied ``(30 - i) * volume`` times a day, so the vocabulary's
order (by total applications) is the same every night. A damaged day applies the tags to random
movies, six times as often: the structure drowns in noise.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

GENRES = ["Drama", "Comedy", "Action"]
N_MOVIES = 150
N_TAGS = 24
TAGS = [f"{GENRES[i % 3].lower()} tag {i}" for i in range(N_TAGS)]


def write_movies(input_dir: Path) -> None:
    input_dir.mkdir(parents=True, exist_ok=True)
    lines = ["movieId,title,genres"] + [f"{m},Movie {m} ({1950 + m % 60}),{GENRES[m % 3]}" for m in range(1, N_MOVIES + 1)]
    (input_dir / "movies.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_day(input_dir: Path, date: str, seed: int, damaged: bool = False) -> int:
    """One day's tags.csv; returns the number of events."""
    rng = np.random.default_rng(seed)
    start = int(dt.datetime.combine(dt.date.fromisoformat(date), dt.time(), dt.UTC).timestamp())
    movies = np.arange(1, N_MOVIES + 1)
    rows = ["userId,movieId,tag,timestamp"]
    for i, tag in enumerate(TAGS):
        n = (30 - i) * (6 if damaged else 1)
        pool = movies if damaged else movies[movies % 3 == i % 3]
        for m in rng.choice(pool, n):
            # Unique timestamps: no event is a duplicate, so the counts (and the vocabulary order) are exact.
            rows.append(f"{rng.integers(1, 500)},{m},{tag},{start + len(rows)}")
    out = input_dir / "tags" / f"date={date}" / "tags.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return len(rows) - 1


def overrides(input_dir: Path, root: Path, date: str) -> list[str]:
    """A tiny nightly: 24-16-2 model, one pretraining and two fine-tuning epochs, no maps."""
    return [
        "data.source=movielens_tags",
        f"data.input={input_dir}",
        f"paths.root={root}",
        "data.logs.vocab_size=32",
        "data.logs.min_support=1",
        "spark.master=local[2]",
        "spark.shuffle_partitions=2",
        "spark.driver_memory=1g",
        "model.layers=[24,16,2]",
        "pretrain.epochs=1",
        "pretrain.optimizer=adam",
        "pretrain.lr=0.01",
        "pretrain.batch_size=16",
        "finetune.epochs=2",
        "finetune.optimizer=adam",
        "finetune.lr=0.01",
        "finetune.batch_size=16",
        "train.val_fraction=0.2",
        "train.device=cpu",
        "train.threads=1",
        "train.progress=false",
        "infer.k=5",
        "infer.map_max_points=0",
        f"nightly.date={date}",
    ]
