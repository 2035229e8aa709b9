"""The one Spark fixture: a session-scoped local[2] SparkSession for every test that needs it."""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Spark's Python workers must run the interpreter that runs the tests (with the pinned packages).
os.environ["PYSPARK_PYTHON"] = sys.executable
os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
# Tests talk to loopback only, whatever the hostname resolves to.
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

JDBC_JAR = "/usr/share/java/postgresql.jar"  # scripts/setup_system.sh installs it
# The driver JVM is started by whichever test first needs Spark: the `spark` fixture, or a job run
# in-process (`sae infer ...` in a CLI test), which builds its own session. The JDBC driver must be on
# that JVM's class path from the start (a jar added to a later session reaches the executors, not the
# driver's DriverManager: ClassNotFoundException when a CLI test ran first), whatever order tests
# run in (-k, one file), so it is given here, before any of them.
# SAE_TESTS_FAST=1 (make test-fast) sets that JVM up for a short session of tiny, different queries,
# none of which repays compiling: the C1 JIT only (not C2), expressions interpreted rather than
# generated and compiled as Java (`spark.sql.codegen.*`), and no adaptive re-planning (one job per
# query rather than one per shuffle stage). A warm 7-line ratings ingest: 5.2 s -> 3.4-4.0 s. The
# results are the same by Spark's contract; the whole suite (`make test`, CI) keeps Spark's defaults,
# the settings users run with.
_JVM: list[str] = []
if os.environ.get("SAE_TESTS_FAST") == "1":
    _JVM = ["--driver-java-options", "-XX:TieredStopAtLevel=1",
            "--conf", "spark.sql.codegen.wholeStage=false", "--conf", "spark.sql.codegen.factoryMode=NO_CODEGEN",
            "--conf", "spark.sql.adaptive.enabled=false"]
os.environ.setdefault("PYSPARK_SUBMIT_ARGS", shlex.join(
    _JVM + (["--jars", JDBC_JAR] if os.path.isfile(JDBC_JAR) else []) + ["pyspark-shell"]))


@pytest.fixture(scope="session", autouse=True)
def mlflow_store_template(tmp_path_factory):
    """Every new sqlite MLflow store in this test process starts as a byte copy of the first one, which
    MLflow created and migrated itself: its schema migrations cost ~0.8 s a store, and the suite makes
    dozens (a copy: ~0.05 s). The copy is taken before MLflow adds the store's default experiment, so
    each store still writes its own, with its own artifact root."""
    import shutil

    import mlflow.store.db.utils as db_utils
    import mlflow.store.model_registry.sqlalchemy_store as registry_store

    original = db_utils._initialize_tables
    template = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"

    def initialize(engine) -> None:  # noqa: ANN001 - MLflow's own signature
        path = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
        fresh = bool(path) and path != ":memory:" and os.path.isfile(path) and os.path.getsize(path) == 0
        if not fresh or not template.exists():
            original(engine)
            if fresh:
                shutil.copyfile(path, template)
            return
        engine.dispose()  # no pooled connection may hold the empty file while it is replaced
        shutil.copyfile(template, path)

    db_utils._initialize_tables = registry_store._initialize_tables = initialize
    yield
    db_utils._initialize_tables = registry_store._initialize_tables = original


@pytest.fixture()
def one_thread():
    """One torch thread for the test: on two shared cores tiny nets run faster, and sums are
    bit-reproducible."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture()
def mlflow_reset():
    """Point MLflow back at its default store after the test (tests use their own sqlite stores)."""
    yield
    import mlflow

    mlflow.set_tracking_uri("")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """``features/`` and ``items/`` of 600 generated rows of width 32 with 4 labels
    (``tests.train_data.manifold``), written once per module."""
    from tests.train_data import manifold, write_features

    root = tmp_path_factory.mktemp("data")
    x, labels = manifold(600, 32, seed=3)
    write_features(root, x, labels)
    return root


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from pyspark.sql import SparkSession

    warehouse = tmp_path_factory.mktemp("spark-warehouse")
    session = (
        SparkSession.builder.master("local[2]")
        .appName("sae-tests")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.default.parallelism", "2")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.warehouse.dir", str(warehouse))
        .config("spark.ui.enabled", "false")
        .config("spark.driver.memory", "2g")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def load_file(relpath: str) -> ModuleType:
    """Import the repository's ``relpath`` (``scripts/X.py``, ``benchmarks/X.py``: plain scripts, not a
    package) as a fresh module named after the file, without touching sys.path; each call runs it anew,
    so a test's monkeypatching stays in its own copy."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def spark_cluster(tmp_path_factory):
    """A real standalone cluster on 127.0.0.1 (master + two 1-core/1g workers); yields its master URL.

    Separate from ``spark``: only tests that spark-submit through a cluster ask for it. Ports are
    picked free at start; the daemons' process groups (executors included) are killed at teardown,
    also when a test fails, and by the kernel if pytest itself dies (PR_SET_PDEATHSIG).
    """
    cluster_mod = load_file("scripts/standalone_cluster.py")
    with cluster_mod.StandaloneCluster(tmp_path_factory.mktemp("standalone-cluster")) as cluster:
        yield cluster.master_url
