"""Cluster smoke check: do the executors run the shipped project, and can a job publish a table?

    scripts/submit.sh --master spark://HOST:7077 jobs/cluster_check.py paths.root=/shared/sae/check

Runs small tasks on every executor that import ``pipelines.schemas`` and ``pipelines.publish``
there, and publishes table ``cluster_check`` (the ``features`` contract plus where each row was
made: executor work dir and the files the modules came from) atomically under ``paths.root``.
Prints a JSON summary. Only meant for spark-submit; run it after changing a cluster or an image.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

from jobs.common import log, new_parser, resolve, setup_logging, spark_session
from pipelines.config import Config

DESCRIPTION = "Check that executors import the shipped project and that publishing works on this cluster."
TABLE = "cluster_check"
ROWS_PER_PARTITION = 5


def make_rows(partition: int, _rows: Iterator[Any]) -> Iterator[tuple]:
    """On an executor: rows that conform to ``features`` and say where they were made."""
    import os
    import time

    import pipelines.publish
    import pipelines.schemas

    width = len(pipelines.schemas.FEATURES.fieldNames())  # 2: the contract is visible here
    time.sleep(0.5)  # hold the core so the scheduler spreads partitions over both executors
    for i in range(ROWS_PER_PARTITION):
        item_id = partition * ROWS_PER_PARTITION + i
        yield (
            item_id,
            [float(item_id)] * width,
            partition,
            os.getcwd(),
            pipelines.schemas.__file__,
            pipelines.publish.__file__,
        )


def run(spark: Any, cfg: Config, partitions: int) -> dict[str, Any]:
    from pyspark.sql import types as T

    from pipelines.publish import publishing, table_path
    from pipelines.schemas import FEATURES

    schema = T.StructType(
        FEATURES.fields
        + [
            T.StructField("partition", T.IntegerType(), False),
            T.StructField("executor_cwd", T.StringType(), False),
            T.StructField("schemas_file", T.StringType(), False),
            T.StructField("publish_file", T.StringType(), False),
        ]
    )
    rdd = spark.sparkContext.parallelize(range(partitions), partitions).mapPartitionsWithIndex(make_rows)
    df = spark.createDataFrame(rdd, schema)
    with publishing(cfg.paths.root, [TABLE], spark) as pub:
        df.write.parquet(pub.staging(TABLE))
    # Not read back here (two more jobs): the table says which executor made each row.
    return {
        "master": spark.sparkContext.master,
        "table": table_path(cfg.paths.root, TABLE),
        "rows": partitions * ROWS_PER_PARTITION,
        "executors": spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size() - 1,  # minus the driver
    }


def main(argv: list[str] | None = None) -> int:
    parser = new_parser("cluster_check", DESCRIPTION)
    parser.add_argument("--partitions", type=int, default=4)
    args = parser.parse_intermixed_args(argv)
    setup_logging()
    cfg = resolve(args)
    with spark_session(cfg) as spark:
        summary = run(spark, cfg, args.partitions)
    log.info("cluster check: %d rows written by %d executors to %s", summary["rows"], summary["executors"], summary["table"])
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
