#!/usr/bin/env bash
# Submit a job to a Spark cluster the standard way: the project zipped once into dist/sae.zip and
# shipped with --py-files, Python on the executors = this project's venv.
#
#   scripts/submit.sh --master spark://127.0.0.1:7077 jobs/ingest.py --config conf/local.yaml key=value ...
#
# Every argument goes to spark-submit unchanged (spark-submit options, then the job file, then the
# job's own arguments); this script adds --py-files and the Python settings.
#   SAE_PYTHON         interpreter for the executors (default: .venv/bin/python of this checkout).
#                      On one machine that path exists everywhere. On a real cluster ship the venv:
#                      venv-pack -o venv.tar.gz, then add --archives venv.tar.gz#environment and set
#                      SAE_PYTHON=./environment/bin/python; or run the executors from the Docker image.
#   SAE_DRIVER_PYTHON  interpreter for the driver, which runs here (client mode); default: the venv's.
#   SAE_DIST           where sae.zip is built (default: dist/ of this checkout).
# The driver finds conf/ through SAE_CONF_DIR (default: conf/ of this checkout), whatever the cwd.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
driver_python=${SAE_DRIVER_PYTHON:-$repo/.venv/bin/python}
python=${SAE_PYTHON:-$driver_python}
dist=${SAE_DIST:-$repo/dist}

if [ "$#" -eq 0 ]; then
  sed -n '2,18p' "$0" >&2
  exit 2
fi
if [ ! -x "$driver_python" ]; then
  echo "error: no Python at $driver_python (run 'make setup', or set SAE_DRIVER_PYTHON)" >&2
  exit 1
fi

zip=$("$driver_python" "$repo/scripts/build_pyfiles.py" -o "$dist/sae.zip")
spark_home=$("$driver_python" -c 'import importlib.util as u; print(u.find_spec("pyspark").submodule_search_locations[0])')

export SPARK_HOME=$spark_home
export PYSPARK_PYTHON=$python
export PYSPARK_DRIVER_PYTHON=$driver_python
export SAE_CONF_DIR=${SAE_CONF_DIR:-$repo/conf}

exec "$spark_home/bin/spark-submit" \
  --py-files "$zip" \
  --conf "spark.pyspark.python=$python" \
  "$@"
