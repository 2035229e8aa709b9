"""What every job shares: argument parsing, config resolution, the SparkSession, logging.

Jobs own the SparkSession and the config; library code in ``pipelines/`` and ``sae_model/``
receives them. Nothing imports ``jobs/`` except the jobs themselves.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
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
  data.table.*       format, shape (wide|long|array), id_column, id_type, feature_columns, label_column, ... (source=table)
  data.events.*      entity_column, token_column, weight_column, weighting, top_k, min_support, ... (source=events)
  data.text.*        layout, strip_headers, vocab_size, min_df, weighting, encoding, ... (source=text)
  data.options       reader options for table/events/text inputs (header, sep, quote, encoding, ...)
  paths.root         where every output of the pipeline goes (features/, items/, ...)
  spark.master       local[*], spark://HOST:PORT, yarn, k8s://...
  model.*            layers (e.g. [1128,1000,500,250,2]), activation, code_activation, init (default|glorot4)
  pretrain.*         method (autoencoder|rbm|none), epochs, lr, batch_size, loss_reduction (mean|sum), decoder_bias, ...
  finetune.*         epochs, lr, batch_size, loss (mse|bce|tsne|umap), recon_weight, neighbor_batch_size, ...
  train.*            seed, val_fraction, device (auto|cpu|cuda), split_column + train_value (train only on the
                     items/ rows whose column equals train_value; sae evaluate scores the rest), ...
  infer.*            model_uri, k, metric, layer, method, force (publish a model marked unhealthy),
                     placement (encoder|refine: place the items outside train.split_column against the training map)
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
    java_log = quiet_java_traces(spark)
    spark.sparkContext.setLogLevel("WARN")
    if java_log is not None:
        log.debug("Spark's full log: %s", java_log)
    return spark


# The driver JVM's console: one line per event (a failed task's log message carries its whole Java
# trace, hundreds of lines for one full disk); the complete messages go to a file beside the debug logs.
_LOG4J = """\
rootLogger.level = warn
rootLogger.appenderRef.console.ref = console
rootLogger.appenderRef.file.ref = file
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{{yy/MM/dd HH:mm:ss}} %p %c{{1}}: %replace{{%m}}{{(?s)[\\r\\n].*}}{{ (more in {path})}}%n%throwable{{none}}
appender.file.type = File
appender.file.name = file
appender.file.fileName = {path}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = %d{{yy/MM/dd HH:mm:ss}} %p %c: %m%n%ex
"""


def quiet_java_traces(spark: Any) -> Path | None:
    """Reconfigure the driver JVM's log4j: console lines cut to their first line, everything in a file
    under :func:`debug_log_dir` (returned). Done after the JVM started, so it holds under spark-submit
    too; a failure to do it leaves Spark's own logging as it was (None)."""
    try:
        d = debug_log_dir()
        d.mkdir(parents=True, exist_ok=True)
        stamp = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}"
        path = d / f"spark-{stamp}.log"
        props = d / f"log4j2-{stamp}.properties"
        props.write_text(_LOG4J.format(path=path), encoding="utf-8")
        jvm = spark.sparkContext._jvm
        jvm.org.apache.logging.log4j.core.config.Configurator.reconfigure(jvm.java.net.URI(props.as_uri()))
        return path
    except Exception as exc:  # noqa: BLE001 - logging set-up must never stop a job
        log.debug("Spark's logging left as it is: %s", exc)
        return None


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


def training_session(cfg: Config) -> Any:
    """A context giving the SparkSession training needs: the job's session when
    ``train.distributed.num_processes > 1`` (TorchDistributor runs on Spark), else None."""
    return spark_session(cfg) if cfg.train.distributed.num_processes > 1 else nullcontext()


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


def print_summary(summary: dict) -> None:
    """What ``sae infer`` and ``sae run`` print: the tables, the maps, the model and the MLflow store."""
    print(f"codes:      {summary['codes']}  ({summary['items']:,} items, code width {summary['code_width']})")
    rec = f", recall@k against exact {summary['recall']:.4f}" if "recall" in summary else ""
    print(f"neighbours: {summary['neighbors']}  (method {summary['method']}{rec})")
    for path in summary.get("maps", []):
        print(f"map:        {path}")
    print(f"model:      {summary['model_uri']} (run {summary['run_id']}, version {summary['model_version']})")
    uri = summary.get("tracking_uri", "")
    print(f"MLflow:     {uri}")
    if uri.startswith("sqlite:"):
        # Quoted for the shell: a paths.root with a space or # must still paste as one argument.
        print(f"            open the UI with: mlflow ui --backend-store-uri {shlex.quote(uri)}")


# ---------------------------------------------------------------- errors at the top of every command

# What the machine, not the input or the code, is to blame for: named with the path and the cause.
FAULT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
# The same causes as the JVM (Hadoop, Parquet) and sqlite word them; value = the cause as we print it.
FAULT_TEXTS = {
    "No space left on device": "No space left on device",
    "Disk quota exceeded": "Disk quota exceeded",
    "Read-only file system": "Read-only file system",
    "Permission denied": "Permission denied",
    "File too large": "File too large",
    "database or disk is full": "No space left on device",
    "attempt to write a readonly database": "Read-only file system",
    "Mkdirs failed to create": "cannot create the directory",
}
_PATH = re.compile(r"(?:file:)?(/[^\s'\"()\[\],]+)")
_FILE_PATH = re.compile(r"file:(/[^\s'\"()\[\],]+)")


def environment_fault(exc: BaseException, root: str | None = None) -> tuple[str | None, str] | None:
    """``(path or None, cause)`` when ``exc`` or what raised it is an environment fault (a full or
    read-only disk, a missing permission), else None. Looks through Python's exception chain and the
    text of Java exceptions (Py4J), whose OS error survives only as words. The path is the one on
    the line naming the cause, else the first ``file:`` path in the text; ``root`` (``paths.root``)
    anchors a path that holds spaces."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in FAULT_ERRNOS:
            return (None if e.filename is None else str(e.filename)), os.strerror(e.errno)
        text = str(e)
        for words, cause in FAULT_TEXTS.items():
            at = text.find(words)
            if at >= 0:
                return _path_in(text, at, root), cause
        todo += [e.__cause__, e.__context__]
    return None


def _path_in(text: str, at: int, root: str | None) -> str | None:
    line_start = text.rfind("\n", 0, at) + 1
    line_end = text.find("\n", at)
    line = text[line_start : len(text) if line_end < 0 else line_end]
    if root:
        base = str(local_path(root)) if is_local(root) else root
        for hay in (line, text):
            i = hay.find(base)
            if i >= 0:  # the root may hold spaces: read on from its end to the next delimiter only
                m = re.match(r"[^\s'\"()\[\],]*", hay[i + len(base) :])
                return (base + m.group(0)).rstrip(".:;")
    found = _PATH.findall(line) or _FILE_PATH.findall(text)
    return found[0].rstrip(".:;") if found else None


def debug_log_dir() -> Path:
    """Where full traces go: ``SAE_LOG_DIR``, else ``sae-logs/`` in the system temporary folder
    (not under ``paths.root``, which may be the full or read-only disk being reported)."""
    return Path(os.environ.get("SAE_LOG_DIR") or Path(tempfile.gettempdir()) / "sae-logs")


def write_debug_log(exc: BaseException) -> Path | None:
    """The full trace of ``exc`` in a new file under :func:`debug_log_dir`; None if that fails too."""
    try:
        d = debug_log_dir()
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"sae-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}.log"
        path.write_text(f"sae {' '.join(sys.argv)}\n\n" + "".join(traceback.format_exception(exc)), encoding="utf-8")
        return path
    except OSError:
        return None


def _root_from_argv(argv: list[str]) -> str | None:
    """``paths.root`` of the command line ``argv`` (to name the disk when the error names no path)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", "-c", default=None)
    parser.add_argument("--preset", default=None)
    try:
        args, rest = parser.parse_known_args(argv)
        overrides = [a for a in rest if "=" in a and not a.startswith("-")]
        return load_config(args.config, overrides, args.preset).paths.root
    except (ConfigError, SystemExit):
        return None


def guarded(main: Callable[[], int], argv: list[str] | None = None) -> int:
    """Run a command's ``main`` with the errors every command shares turned into one line and exit 2.

    Environment faults print ``environment error: PATH: CAUSE (full trace in FILE)``; a model URI
    that does not resolve prints ``error: ...``; a ``ConfigError`` raised past the config's loading
    ``config error: KEY: ...``. Anything else propagates with its traceback (a bug).
    Used by ``sae``'s main and by each job's ``__main__`` (the spark-submit entry points) alike.
    """
    from sae_model.registry import ModelURIError

    try:
        return int(main() or 0)
    except ModelURIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:  # a setting found wrong after resolve() (e.g. by a source's check)
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        root = _root_from_argv(sys.argv[1:] if argv is None else argv)
        fault = environment_fault(exc, root)
        if fault is None:
            raise
        path, cause = fault
        path = path or root or "paths.root"
        trace = write_debug_log(exc)
        where = f"full trace in {trace}" if trace else "no debug log: the temporary folder is not writable either"
        print(f"environment error: {path}: {cause} ({where})", file=sys.stderr)
        return 2
