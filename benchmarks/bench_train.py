"""Training throughput: Petastorm-fed vs in-memory, and fine-tuning FLOP/s vs plain torch.mm.

    python benchmarks/bench_train.py                       # 1128-1000-500-250-2, batch 256
    python benchmarks/bench_train.py --rows 4000 --epochs 1  # quick
    python benchmarks/bench_train.py --mnist-workload --mnist-data ../shared/data/mnist   # the talk's MNIST run, timed
    python benchmarks/bench_train.py --layers 784,1000,500,250,2 --rows 60000 --mnist-data ../shared/data/mnist

``--mnist-data DIR`` (an idx folder: ``train-images-idx3-ubyte[.gz]``, then ``t10k-...``) feeds real
MNIST images instead of uniform noise: the first ``--mnist-rows`` (workload) or ``--rows`` (feed
benchmark) of the training images, then of the test images. The workload reports its pretraining
and fine-tuning seconds apart, and ``--json-out`` writes them for ``benchmarks/gpu_talk_workload.sh``.

Both feeds run the trainer's own epoch loop (``Trainer.train_epoch``) on the same model and data;
only the source differs. FLOPs of one fine-tuning sample = 6 x (multiply-adds of every Linear,
encoder and decoder): forward 2, backward 4. The torch.mm reference runs the same three matrix
products per layer (forward, grad of input, grad of weight) at the same batch size.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sae_model.config import FinetuneConfig, ModelConfig, PretrainConfig, TrainConfig
from sae_model.data import InMemorySource, StreamingSource, inspect_table, load_table, to_uri
from sae_model.idx import IMAGES_MAGIC, IdxError, read_idx
from sae_model.trainer import (
    FunctionCallback,
    MlflowSettings,
    Stage,
    Trainer,
    build_model,
    resolve_device,
    train,
)


def read_mnist(folder: Path, rows: int) -> np.ndarray:
    """The first ``rows`` MNIST images of ``folder`` (training images, then test images) as float32 (rows,
    784) in [0, 1], read by ``sae_model.idx`` (the ingest's parser, importable without pyspark). Exits 2
    with one input-error line when the folder holds fewer images or a file is damaged."""
    parts = []
    try:
        for prefix in ("train", "t10k"):
            found = sorted(folder.glob(f"{prefix}-images-idx3-ubyte*"))
            if found:
                images = read_idx(found[0], IMAGES_MAGIC, 3)
                parts.append(images.reshape(len(images), -1))
    except IdxError as exc:
        print(f"input error: {exc}", flush=True)
        raise SystemExit(2) from None
    x = np.concatenate(parts) if parts else np.zeros((0, 784), np.uint8)
    if len(x) < rows:
        print(f"input error: {folder}: {len(x)} MNIST images, {rows} asked for", flush=True)
        raise SystemExit(2)
    return x[:rows].astype(np.float32) / np.float32(255.0)


def write_parquet(path: Path, rows: int, dim: int, seed: int = 0, row_group: int = 4096, data: np.ndarray | None = None) -> str:
    """A features table of ``rows`` x ``dim``: ``data``'s rows, or uniform noise in [0, 1)."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    for k, s in enumerate(range(0, rows, 65536)):
        n = min(65536, rows - s)
        x = rng.random((n, dim), dtype=np.float32) if data is None else data[s : s + n]
        feats = pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32)), pa.array(x.reshape(-1)))
        t = pa.table({"item_id": pa.array(np.arange(s, s + n, dtype=np.int64)), "features": feats})
        pq.write_table(t, path / f"part-{k:05d}.parquet", row_group_size=row_group)
    return to_uri(path)


def flops_per_sample(layers: list[int]) -> float:
    macs = sum(a * b for a, b in zip(layers[:-1], layers[1:], strict=True)) * 2  # encoder + decoder
    return 6.0 * macs


def mm_flops(layers: list[int], batch: int, device: torch.device, seconds: float) -> float:
    """FLOP/s of the fine-tuning step's matrix products alone, as plain torch.mm calls."""
    shapes = []
    for a, b in zip(layers[:-1], layers[1:], strict=True):
        shapes += [(a, b), (b, a)]  # encoder a->b, decoder b->a
    mats = []
    for i, o in shapes:
        x, w, g = (torch.rand(batch, i, device=device), torch.rand(i, o, device=device), torch.rand(batch, o, device=device))
        mats.append((x, w, g))

    def once() -> None:
        for x, w, g in mats:
            torch.mm(x, w)  # forward
            torch.mm(g, w.t())  # grad of the input
            torch.mm(x.t(), g)  # grad of the weight

    once()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        once()
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return n * batch * flops_per_sample(layers) / dt


def trainer_for(layers: list[int], batch: int, source, device: torch.device, tmp: Path, lr: float = 0.01) -> tuple[Trainer, Stage]:
    tc = TrainConfig(seed=0, progress=False)
    tr = Trainer(
        build_model(ModelConfig(layers=layers), 0),
        PretrainConfig(method="none"),
        FinetuneConfig(epochs=1, lr=lr, batch_size=batch),
        tc, source, device, tmp / "ck",
    )
    stage = tr.stages()[-1]
    tr.optimizer = tr._optimizer_for(stage)
    return tr, stage


def timed_epochs(tr: Trainer, stage: Stage, epochs: int, n_train: int, device: torch.device) -> float:
    tr.train_epoch(stage, 0)  # warm-up (allocations, reader start)
    t0 = time.perf_counter()
    for e in range(epochs):
        tr.train_epoch(stage, e + 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return epochs * n_train / (time.perf_counter() - t0)


def feed_benchmark(args: argparse.Namespace, device: torch.device) -> None:
    layers = [int(w) for w in args.layers.split(",")]
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        real = read_mnist(args.mnist_data, args.rows) if args.mnist_data else None
        uri = write_parquet(tmp / "features", args.rows, layers[0], data=real)
        info = inspect_table(uri, layers[0])
        ids, x = load_table(uri, layers[0])
        mem = InMemorySource(ids, x, 0.0, device)
        stream = None if args.memory_only else StreamingSource(uri, info, 0.0, device, args.workers, args.reader_cache_mb)
        n = len(ids)
        # Interleave the two feeds so a busy shared machine hurts both alike.
        mem_rates, stream_rates = [], []
        mm_rates = []
        for _ in range(args.repeats):
            tr, st = trainer_for(layers, args.batch, mem, device, tmp)
            mem_rates.append(timed_epochs(tr, st, args.epochs, n, device))
            # torch.mm right after each in-memory pass: on a shared machine both see the same load.
            mm_rates.append(mm_flops(layers, args.batch, device, seconds=args.mm_seconds))
            if not args.memory_only:
                tr, st = trainer_for(layers, args.batch, stream, device, tmp)
                stream_rates.append(timed_epochs(tr, st, args.epochs, n, device))
        mem_rate, mm = max(mem_rates), max(mm_rates)
        stream_rate = max(stream_rates) if stream_rates else float("nan")
    fps = flops_per_sample(layers)
    what = f"real MNIST from {args.mnist_data}" if args.mnist_data else "uniform noise"
    print(f"device {device}, torch threads {torch.get_num_threads()}, model {'-'.join(map(str, layers))}, batch {args.batch}, rows {n} ({what})")
    print(f"in-memory tensor : {mem_rate:10.0f} samples/s   ({mem_rate * fps / 1e9:.1f} GFLOP/s fine-tuning)")
    if args.memory_only:
        print(f"torch.mm same shapes             : {mm / 1e9:.1f} GFLOP/s")
        print(f"fine-tuning (in-memory) / torch.mm: {mem_rate * fps / mm:.3f}   (target >= 0.85)")
        return
    print(f"Petastorm Parquet: {stream_rate:10.0f} samples/s   ({stream_rate * fps / 1e9:.1f} GFLOP/s)")
    print(f"Petastorm / in-memory            : {stream_rate / mem_rate:.3f}   (target >= 0.95)")
    print(f"torch.mm same shapes             : {mm / 1e9:.1f} GFLOP/s")
    print(f"fine-tuning (in-memory) / torch.mm: {mem_rate * fps / mm:.3f}   (target >= 0.85)")


def mnist_workload(args: argparse.Namespace, device: torch.device) -> None:
    """The talk's MNIST run: 784-1000-500-250-2, 15 pretraining epochs x 4 layers, 5 fine-tuning epochs."""
    layers = [784, 1000, 500, 250, 2]
    spent = {"pretrain": 0.0, "finetune": 0.0}

    def clock(trainer: Trainer, stage: Stage, record) -> None:  # noqa: ANN001 - EpochRecord
        spent[stage.kind] += record.seconds

    if device.type == "cuda":
        torch.ones(1, device=device).sum().item()  # the CUDA context is made before the clock starts
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        real = read_mnist(args.mnist_data, args.mnist_rows) if args.mnist_data else None
        uri = write_parquet(tmp / "features", args.mnist_rows, 784, data=real)
        t0 = time.perf_counter()
        r = train(
            ModelConfig(layers=layers),
            PretrainConfig(method=args.mnist_method, epochs=args.mnist_pretrain_epochs, lr=0.1, batch_size=100),
            FinetuneConfig(epochs=args.mnist_finetune_epochs, lr=0.01, batch_size=100, loss="bce"),
            TrainConfig(seed=0, progress=False, val_fraction=0.0, mixed_precision=args.amp, device=args.device),
            uri, None, MlflowSettings("", enabled=False), tmp / "ck", callbacks=[FunctionCallback(clock)],
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    ft_rate = args.mnist_rows * args.mnist_finetune_epochs / spent["finetune"] if spent["finetune"] else float("nan")
    out = {
        "device": str(device), "torch_threads": torch.get_num_threads(), "rows": args.mnist_rows,
        "data": str(args.mnist_data) if args.mnist_data else "uniform noise", "method": args.mnist_method,
        "pretrain_epochs": args.mnist_pretrain_epochs, "finetune_epochs": args.mnist_finetune_epochs,
        "seconds": dt, "pretrain_seconds": spent["pretrain"], "finetune_seconds": spent["finetune"],
        "finetune_gflops": ft_rate * flops_per_sample(layers) / 1e9, "health": r.health,
    }
    print(
        f"MNIST workload on {device} ({out['data']}): {args.mnist_rows} samples, {args.mnist_method} pretraining "
        f"{args.mnist_pretrain_epochs} epochs x 4 layers ({spent['pretrain']:.1f} s), {args.mnist_finetune_epochs} "
        f"fine-tuning epochs ({spent['finetune']:.1f} s, {out['finetune_gflops']:.1f} GFLOP/s): {dt:.1f} s in all "
        f"(health {r.health})"
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1), encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="1128,1000,500,250,2")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per feed (after one warm-up epoch)")
    p.add_argument("--repeats", type=int, default=2, help="alternate the feeds this many times; best of each")
    p.add_argument("--workers", type=int, default=2, help="Petastorm reader threads")
    p.add_argument("--reader-cache-mb", type=int, default=0, help="train.reader_cache_mb: Petastorm's local-disk cache")
    p.add_argument("--mm-seconds", type=float, default=5.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--memory-only", action="store_true", help="skip the Petastorm feed: in-memory vs torch.mm only")
    p.add_argument("--mnist-workload", action="store_true")
    p.add_argument("--mnist-rows", type=int, default=50000)
    p.add_argument("--mnist-data", type=Path, default=None, help="idx folder of real MNIST (default: uniform noise)")
    p.add_argument("--json-out", default="", help="--mnist-workload: also write its timings here as JSON")
    p.add_argument("--mnist-pretrain-epochs", type=int, default=15)
    p.add_argument("--mnist-finetune-epochs", type=int, default=5)
    p.add_argument("--mnist-method", default="rbm", choices=["rbm", "autoencoder", "none"])
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.mnist_workload:
        mnist_workload(args, device)
    else:
        feed_benchmark(args, device)


if __name__ == "__main__":
    main()
