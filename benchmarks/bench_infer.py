"""Benchmark: Spark batch scoring vs in-process torch, and neighbour-table time by size.

    .venv/bin/python benchmarks/bench_infer.py --rows 200000 --cores 2 --neighbors 10000,100000,1000000

Same model (1128-1000-500-250-2), same rows, same core count: prints rows/s of Spark scoring (the
job's Parquet route and the generic DataFrame route) and of in-process torch batch inference
(reading the same Parquet, and, as a ceiling, encoding rows already in memory), and the ratio
(target >= 0.7). Then times the neighbour table for 2-D codes at each size and prints recall.

    .venv/bin/python benchmarks/bench_infer.py --rows 200000 --neighbors "" --layers 784,1000,500,250,2 \
        --rows-from /tmp/mnist_split.npz

scores real held-out MNIST images (``x_val`` of ``bench_tsne_mnist.py --dump-split``, repeated up
to ``--rows``) with the MNIST stack, the rows that ``bench_tsne_mnist.py --umap-only
--transform-rows`` gives to ``UMAP.transform`` (issue 9 compares the two rates).
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
from pipelines.scoring import list_column, matrix, score, score_parquet  # noqa: E402
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


def _timed_noop(df) -> float:  # noqa: ANN001
    """Seconds of a full pass writing ``df`` nowhere, after one untimed pass that starts every
    Python worker and loads the model in each (a one-off cost a long job amortises)."""
    df.write.mode("overwrite").format("noop").save()
    t = time.perf_counter()
    df.write.mode("overwrite").format("noop").save()
    return time.perf_counter() - t


def bench_scoring(spark, tmp: Path, rows: int, cores: int, batch: int, layers: list[int], rows_from: str | None) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = StackedAutoencoder(layers)
    model_dir = str(save_model(model, tmp / "model"))
    if rows_from:
        src = np.load(rows_from)["x_val"].astype(np.float32)
        if src.shape[1] != layers[0]:
            raise SystemExit(f"--rows-from: rows are {src.shape[1]} wide, --layers start at {layers[0]}")
        x = np.resize(src, (rows, layers[0]))  # repeated in order up to --rows
    else:
        x = np.random.default_rng(0).random((rows, layers[0]), dtype=np.float32)
    raw = tmp / "raw"
    raw.mkdir()
    for p, chunk in enumerate(np.array_split(np.arange(rows), 2 * cores)):
        pq.write_table(pa.table({"item_id": chunk.astype(np.int64), "features": list_column(x[chunk])}), raw / f"p{p}.parquet")
    del x
    # Written by Spark, as ingest writes features/ (snappy, Spark's row-group size).
    feats = str(tmp / "features")
    spark.read.parquet(str(raw)).repartition(4 * cores).write.parquet(feats)
    spark_rps = rows / _timed_noop(score_parquet(spark, feats, model_dir, batch_rows=batch))
    spark_df_rps = rows / _timed_noop(score(spark, spark.read.parquet(feats), model_dir, batch_rows=batch))

    torch.set_num_threads(cores)
    enc = Encoder(model)
    files = sorted(Path(feats).glob("*.parquet"))
    t = time.perf_counter()  # in-process batch inference: read the same Parquet, encode every row
    for f in files:
        for b in pq.ParquetFile(f).iter_batches(batch_size=batch, columns=["item_id", "features"]):
            enc.encode(matrix(b.column("features"), layers[0]))
    torch_rps = rows / (time.perf_counter() - t)
    xs = pq.read_table(feats).column("features").combine_chunks().flatten().to_numpy().reshape(rows, layers[0])
    t = time.perf_counter()  # the encoding alone, rows already in memory: a ceiling no reader reaches
    for s in range(0, rows, batch):
        enc.encode(xs[s : s + batch])
    encode_rps = rows / (time.perf_counter() - t)
    what = f"rows of {rows_from} repeated" if rows_from else "random rows"
    print(f"scoring {rows:,} {what}, {'-'.join(map(str, layers))}, on {cores} cores, rows/s:")
    print(f"  spark, row groups read by the Python workers (the job's route) {spark_rps:>9,.0f}")
    print(f"  spark, DataFrame through the JVM's Arrow conversion            {spark_df_rps:>9,.0f}")
    print(f"  in-process torch, reading the same Parquet and encoding        {torch_rps:>9,.0f}")
    print(f"  in-process torch, encoding rows already in memory              {encode_rps:>9,.0f}")
    print(f"ratio spark / in-process torch batch inference: {spark_rps / torch_rps:.2f} (target >= 0.7); "
          f"DataFrame route {spark_df_rps / torch_rps:.2f}; against encoding alone {spark_rps / encode_rps:.2f}")


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
    ap.add_argument("--layers", default=",".join(map(str, LAYERS)), help="the model's layer widths")
    ap.add_argument("--rows-from", help="an .npz whose x_val rows are scored (repeated up to --rows)")
    args = ap.parse_args()
    layers = [int(v) for v in args.layers.split(",")]
    spark = spark_session(args.cores)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if args.rows:
                bench_scoring(spark, Path(tmp), args.rows, args.cores, args.batch, layers, args.rows_from)
            for n in [int(s) for s in args.neighbors.split(",") if s]:
                bench_neighbors(spark, Path(tmp), n, args.k)
    finally:
        spark.stop()


if __name__ == "__main__":
    main()
