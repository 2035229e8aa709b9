#!/usr/bin/env bash
# Spark resource discovery script for GPUs (spark.worker.resource.gpu.discoveryScript and
# spark.executor.resource.gpu.discoveryScript). Spark reads one JSON object from stdout:
#   {"name": "gpu", "addresses": ["0","1"]}
# Addresses are the indices nvidia-smi reports (inside a container: the GPUs it was given).
# Without nvidia-smi, or when it fails, it reports no GPUs rather than breaking the worker.
set -euo pipefail

addresses=""
if command -v nvidia-smi >/dev/null 2>&1; then
  if indices=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null); then
    while IFS= read -r line; do
      index=${line//[[:space:]]/}
      [[ $index =~ ^[0-9]+$ ]] || continue
      addresses+="${addresses:+,}\"$index\""
    done <<< "$indices"
  fi
fi
printf '{"name": "gpu", "addresses": [%s]}\n' "$addresses"
