"""Benchmark: Spark batch scoring vs in-process torch, and neighbour-table time by size.

    .venv/bin/python benchmarks/bench_infer.py --rows 200000 --cores 2 --neighbors 10000,100000,1000000

Same model (1128-1000-500-250-2), same rows, same core count: prints rows/s of each and the ratio
(target >= 0.7). Then times the neighbour table for 2-D codes at each size and prints recall.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.neighbors import recall_at_k, top_k_neighbors  # noqa: E402
from pipelines.scoring import list_column, score  # noqa: E402
from sae_model.loading import Encoder, save_model  # noqa: E402
from sae_model.model import StackedAutoencoder  # noqa: E402

LAYERS = [1128, 1000, 500, 250, 2]


def spark_session(cores: int):  # noqa: ANN201
    from pyspark.sql import SparkSession

    os.environ["PYSPARK_PYTHON"] = sys.executable
    return (
        SparkSession.builder.master(f"local[{cores}]")
        .config("spark.driver.memory", "6g")
        .config("spark.sql.shuffle.partitions", str(4 * cores))
        .config("spark.ui.enabled", "false")
        .getOrCreate()
    )


def bench_scoring(spark, tmp: Path, rows: int, cores: int, batch: int) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = StackedAutoencoder(LAYERS)
    model_dir = save_model(model, tmp / "model")
    x = np.random.default_rng(0).random((rows, LAYERS[0]), dtype=np.float32)
    feats = tmp / "features"
    feats.mkdir()
    for p, chunk in enumerate(np.array_split(np.arange(rows), 2 * cores)):
        pq.write_table(pa.table({"item_id": chunk.astype(np.int64), "features": list_column(x[chunk])}), feats / f"p{p}.parquet")
    del x
    df = spark.read.parquet(str(feats))
    out = score(spark, df, str(model_dir), batch_rows=batch)
    out.limit(10).collect()  # start the Python workers and load the model once
    t = time.perf_counter()
    out.write.mode("overwrite").format("noop").save()
    spark_rps = rows / (time.perf_counter() - t)
    torch.set_num_threads(cores)
    xs = pq.read_table(feats).column("features").combine_chunks().flatten().to_numpy().reshape(rows, LAYERS[0])
    enc = Encoder(model)
    t = time.perf_counter()
    for s in range(0, rows, batch):
        enc.encode(xs[s : s + batch])
    torch_rps = rows / (time.perf_counter() - t)
    print(f"scoring {rows:,} rows on {cores} cores: spark {spark_rps:,.0f} rows/s, in-process torch "
          f"{torch_rps:,.0f} rows/s, ratio {spark_rps / torch_rps:.2f} (target >= 0.7)")


def bench_neighbors(spark, tmp: Path, n: int, k: int) -> None:  # noqa: ANN001
    rng = np.random.default_rng(n)
    centres = rng.normal(size=(50, 2)) * 10
    x = (centres[rng.integers(0, 50, n)] + rng.normal(size=(n, 2)) * rng.uniform(0.05, 2, (n, 1))).astype(np.float32)
    path = tmp / f"codes{n}"
    pq.write_table(pa.table({"item_id": np.arange(n, dtype=np.int64), "code": list_column(x)}), path.with_suffix(".parquet"))
    codes = spark.read.parquet(str(path.with_suffix(".parquet"))).repartition(8)
    t = time.perf_counter()
    nb, method = top_k_neighbors(spark, codes, k=k)
    nb.write.mode("overwrite").parquet(str(path) + "-nb")
    took = time.perf_counter() - t
    rec = recall_at_k(spark, codes, spark.read.parquet(str(path) + "-nb"), k, sample=1000)
    print(f"neighbours {n:,} 2-D items, k={k}: {method} in {took:.1f} s, recall@{k} {rec:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200000)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16384)
    ap.add_argument("--neighbors", default="10000,100000,1000000", help="comma-separated sizes ('' = skip)")
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    spark = spark_session(args.cores)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if args.rows:
                bench_scoring(spark, Path(tmp), args.rows, args.cores, args.batch)
            for n in [int(s) for s in args.neighbors.split(",") if s]:
                bench_neighbors(spark, Path(tmp), n, args.k)
    finally:
        spark.stop()


if __name__ == "__main__":
    main()
