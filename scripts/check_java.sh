#!/usr/bin/env bash
# Spark 4 needs Java 17+. Fail set-up early with a clear message instead of a JVM stack trace later.
set -euo pipefail
java_bin="${JAVA_HOME:+$JAVA_HOME/bin/}java"
if ! command -v "$java_bin" >/dev/null 2>&1; then
  echo "error: Java 17 or newer is needed by Spark and was not found." >&2
  echo "       Debian/Ubuntu: sudo apt-get install -y openjdk-17-jre-headless   (or set JAVA_HOME)" >&2
  exit 1
fi
major=$("$java_bin" -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print v[1]; exit}')
if [ -z "$major" ] || [ "$major" -lt 17 ]; then
  echo "error: Java ${major:-?} found; Spark 4 needs Java 17 or newer (set JAVA_HOME to a JDK 17+)." >&2
  exit 1
fi
