#!/usr/bin/env bash
# The talk's MNIST workload (784-1000-500-250-2, RBM pretraining 15 epochs per layer, 5 fine-tuning
# epochs, batch 100, on 50,000 real training images) timed on the GPU and on the CPU of the same
# machine, and the GPU / CPU speed-up (the talk measured 31.4x). Issue 19; one short run on a lent
# GPU machine (a few minutes on an H200: the GPU run is tens of seconds, the CPU slice a few minutes).
#
#   benchmarks/gpu_talk_workload.sh [MNIST_IDX_DIR]
#
# MNIST_IDX_DIR: train-images-idx3-ubyte[.gz] (+ t10k-...); default the first of shared/data/mnist,
# ../shared/data/mnist, data/mnist that exists (data/mnist holds 10,000 test images only: too few).
# The CPU times CPU_ROWS images (default 10,000) and is scaled linearly to ROWS: the same epochs and
# batch size, so its time is proportional to the rows. Env: ROWS (50000), CPU_ROWS (10000),
# PRE_EPOCHS (15), FT_EPOCHS (5), GPU (cuda; "cpu" for a dry run without a GPU), PYTHON (python3).
# Writes gpu.json / gpu_amp.json / cpu.json under $OUT when set (the device tool), else /tmp/gpu_talk.
set -euo pipefail
DATA=""
if [ $# -ge 1 ]; then
  DATA=$(cd "$1" && pwd) || { echo "input error: $1: no such folder" >&2; exit 2; }
fi
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ROWS=${ROWS:-50000}
CPU_ROWS=${CPU_ROWS:-10000}
PRE_EPOCHS=${PRE_EPOCHS:-15}
FT_EPOCHS=${FT_EPOCHS:-5}
GPU=${GPU:-cuda}
if [ -z "$DATA" ]; then
  for d in shared/data/mnist ../shared/data/mnist data/mnist; do
    if ls "$d"/train-images-idx3-ubyte* >/dev/null 2>&1; then DATA=$d; break; fi
  done
fi
if [ -z "$DATA" ]; then
  echo "input error: no MNIST training images (train-images-idx3-ubyte[.gz]) in shared/data/mnist, ../shared/data/mnist or data/mnist; pass the folder" >&2
  exit 2
fi
DEST=${OUT:-/tmp/gpu_talk}
mkdir -p "$DEST"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
common=(benchmarks/bench_train.py --mnist-workload --mnist-data "$DATA" --mnist-pretrain-epochs "$PRE_EPOCHS"
        --mnist-finetune-epochs "$FT_EPOCHS")
if [ "$GPU" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'cpu threads', torch.get_num_threads())"
echo "== $GPU, $ROWS images, float32"
timeout 240 "$PY" "${common[@]}" --device "$GPU" --mnist-rows "$ROWS" --json-out "$DEST/gpu.json"
if [ "$GPU" = cuda ]; then
  echo "== $GPU, $ROWS images, bfloat16 autocast (--amp)"
  timeout 180 "$PY" "${common[@]}" --device "$GPU" --mnist-rows "$ROWS" --amp --json-out "$DEST/gpu_amp.json" || true
fi
echo "== cpu, $CPU_ROWS images (scaled to $ROWS)"
timeout 300 "$PY" "${common[@]}" --device cpu --mnist-rows "$CPU_ROWS" --json-out "$DEST/cpu.json"
"$PY" - "$DEST" "$ROWS" <<'EOF'
import json, pathlib, sys
dest, rows = pathlib.Path(sys.argv[1]), int(sys.argv[2])
cpu = json.loads((dest / "cpu.json").read_text())
scale = rows / cpu["rows"]
cpu_s = cpu["seconds"] * scale
print(f"cpu ({cpu['torch_threads']} threads): {cpu['seconds']:.1f} s for {cpu['rows']} images -> {cpu_s:.1f} s for {rows} "
      f"(pretraining {cpu['pretrain_seconds'] * scale:.1f} s, fine-tuning {cpu['finetune_seconds'] * scale:.1f} s)")
for name in ("gpu.json", "gpu_amp.json"):
    f = dest / name
    if not f.exists():
        continue
    g = json.loads(f.read_text())
    print(f"{name[:-5]}: {g['seconds']:.1f} s for {g['rows']} images (pretraining {g['pretrain_seconds']:.1f} s, "
          f"fine-tuning {g['finetune_seconds']:.1f} s, {g['finetune_gflops']:.0f} GFLOP/s); "
          f"speed-up over the cpu: {cpu_s / g['seconds']:.1f}x (talk: 31.4x)")
EOF
