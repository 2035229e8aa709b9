"""What every job shares: argument parsing, config resolution, the SparkSession, logging.

Jobs own the SparkSession and the config; library code in ``pipelines/`` and ``sae_model/``
receives them. Nothing imports ``jobs/`` except the jobs themselves.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipelines.config import SOURCES, Config, ConfigError, load_config, presets
from pipelines.publish import is_local, local_path

log = logging.getLogger("sae")

KEYS_HELP = """\
config keys (set in YAML or as dotted key=value overrides):
  data.source        one of: {sources}
  data.input         a directory or file (e.g. data/mnist, /data/ml-25m)
  data.limit         read at most this many items (0 = all)
  data.synthetic.*   items, tags, genres, seed, defect_rate (source=synthetic)
  paths.root         where every output of the pipeline goes (features/, items/, ...)
  spark.master       local[*], spark://HOST:PORT, yarn, k8s://...
  model.*            layers (e.g. [1128,1000,500,250,2]), activation, code_activation, init (default|glorot4)
  pretrain.*         method (autoencoder|rbm|none), epochs, lr, batch_size, loss_reduction (mean|sum), decoder_bias, ...
  finetune.*         epochs, lr, batch_size, loss (mse|bce|tsne|umap), recon_weight, neighbor_batch_size, ...
  train.*            seed, val_fraction, device (auto|cpu|cuda), ...
  infer.*            model_uri, k, metric, layer, method, force (publish a model marked unhealthy)
  evaluate.*         k_knn, k_tw, max_items, max_fit_items, seed, umap, after_train
  mlflow.*           tracking_uri, experiment, registered_model
  nightly.*          date, warm_start, metric, margin, align, align_scaling (sae nightly)
presets (--preset): {presets}
"""


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None, help="YAML config layered over conf/base.yaml")
    parser.add_argument("--preset", default=None, help=f"preset layered over the config: {', '.join(presets())}")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.seed=1")


def new_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=KEYS_HELP.format(sources=", ".join(SOURCES), presets=", ".join(presets())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(parser)
    return parser


def resolve(args: argparse.Namespace) -> Config:
    """The resolved config, or exit 2 with a message naming the bad key (before Spark starts)."""
    try:
        return load_config(args.config, args.overrides, args.preset)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("py4j", "urllib3", "alembic", "matplotlib", "PIL", "petastorm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def check_java() -> None:
    """Spark 4 needs Java 17+; say so plainly instead of a JVM stack trace."""
    java = shutil.which("java") if not os.environ.get("JAVA_HOME") else str(Path(os.environ["JAVA_HOME"]) / "bin" / "java")
    if not java or not Path(java).exists():
        raise SystemExit(
            "Java 17 or newer is needed by Spark and was not found. Install it "
            "(Debian/Ubuntu: apt-get install openjdk-17-jre-headless) or set JAVA_HOME."
        )
    out = subprocess.run([java, "-version"], check=False, capture_output=True, text=True).stderr
    try:
        major = int(out.split('"')[1].split(".")[0])
    except (IndexError, ValueError):
        return
    if major < 17:
        raise SystemExit(f"Java {major} found at {java}; Spark 4 needs Java 17 or newer (set JAVA_HOME).")


def under_spark_submit() -> bool:
    # spark-submit starts the JVM first and hands the Python driver its gateway port.
    return "PYSPARK_GATEWAY_PORT" in os.environ


def spark_conf(cfg: Config) -> dict[str, str]:
    """``spark.conf`` plus what the source needs on the classpath before the JVM starts: the JDBC
    driver jar (``data.jdbc.driver_jar``) is appended to ``spark.jars`` when ``data.source=jdbc``."""
    conf = dict(cfg.spark.conf)
    jar = cfg.data.jdbc.driver_jar
    if cfg.data.source == "jdbc" and jar:
        jars = [j for j in conf.get("spark.jars", "").split(",") if j]
        if jar not in jars:
            conf["spark.jars"] = ",".join([*jars, jar])
    return conf


def build_spark(cfg: Config) -> Any:
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(cfg.spark.app_name)
    if not under_spark_submit():
        # Python workers must run this interpreter (with the project's pinned packages), not `python3`.
        os.environ["PYSPARK_PYTHON"] = sys.executable
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        check_java()
        builder = (
            builder.master(cfg.spark.master)
            .config("spark.driver.memory", cfg.spark.driver_memory)
            .config("spark.pyspark.python", sys.executable)
        )
        if cfg.spark.master.startswith("local"):
            # One machine: keep the driver on loopback instead of whatever the hostname resolves to.
            os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
            builder = builder.config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
    # Under spark-submit its --master, --driver-memory and the executors' Python win: on a cluster the
    # executors' interpreter (e.g. ./environment/bin/python from --archives) need not exist here.
    elif not os.environ.get("PYSPARK_PYTHON"):
        os.environ["PYSPARK_PYTHON"] = sys.executable
    builder = (
        builder.config("spark.sql.shuffle.partitions", str(cfg.spark.shuffle_partitions))
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.ui.showConsoleProgress", "true" if sys.stderr.isatty() else "false")
    )
    for key, value in spark_conf(cfg).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


@contextmanager
def spark_session(cfg: Config) -> Iterator[Any]:
    """The job's SparkSession. Re-entrant: inside another job's session (``sae run``) that session is
    reused and left running, so a pipeline starts one JVM, not one per stage."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        yield active
        return
    spark = build_spark(cfg)
    try:
        yield spark
    finally:
        if not under_spark_submit():
            spark.stop()


def record_config(cfg: Config, stage: str) -> Path | None:
    """Keep the fully resolved config each command ran with under ``paths.root/runs/``."""
    if not is_local(cfg.paths.root):
        log.info("resolved config (hash %s):\n%s", cfg.hash(), cfg.to_yaml())
        return None
    out = local_path(cfg.paths.root) / "runs"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{stage}.yaml"
    path.write_text(f"# sae {stage}, config hash {cfg.hash()}\n" + cfg.to_yaml(), encoding="utf-8")
    return path
