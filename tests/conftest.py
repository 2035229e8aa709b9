"""The one Spark fixture: a session-scoped local[2] SparkSession for every test that needs it."""

from __future__ import annotations

import os
import sys

import pytest

# Spark's Python workers must run the interpreter that runs the tests (with the pinned packages).
os.environ["PYSPARK_PYTHON"] = sys.executable
os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable

JDBC_JAR = "/usr/share/java/postgresql.jar"


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
        # The JDBC source's tests need the driver before the JVM starts (scripts/setup_system.sh installs it).
        .config("spark.jars", JDBC_JAR if os.path.isfile(JDBC_JAR) else "")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
