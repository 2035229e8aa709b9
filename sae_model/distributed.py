"""The function each distributed training process runs: join the process group, train, agree on a result.

A launcher outside this package (``pipelines.distributed`` with Spark's TorchDistributor, or plain
``torchrun``) starts ``num_processes`` copies of ``train_worker``; torchrun sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. No pyspark here.
"""

from __future__ import annotations

import logging
import os
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

FAILURES_DIR = "_failures"  # under the checkpoint directory: one file per rank that raised


def failures_dir(checkpoint_dir: str | Path) -> Path:
    """The directory under ``checkpoint_dir`` where each rank that raised leaves its traceback."""
    return Path(checkpoint_dir) / FAILURES_DIR


def read_failures(checkpoint_dir: str | Path) -> list[str]:
    """What the ranks that raised wrote (launchers put it in their error message)."""
    d = failures_dir(checkpoint_dir)
    return [p.read_text(encoding="utf-8") for p in sorted(d.glob("rank*.txt"))] if d.exists() else []


def result_summary(result: Any) -> dict[str, Any]:
    """What a ``TrainResult`` says, without the model (it stays in MLflow and the checkpoint)."""
    return {
        "model_uri": result.model_uri,
        "run_id": result.run_id,
        "model_version": result.model_version,
        "metrics": dict(result.metrics),
        "checkpoint_dir": result.checkpoint_dir,
        "health": result.health,
        "health_findings": list(result.health_findings),
    }


def train_worker(request: Any, use_gpu: bool, timeout_s: int) -> dict[str, Any]:
    """Run ``sae_model.trainer.fit(request)`` (a ``TrainRequest``) as this process's rank; return
    rank 0's summary.

    Every rank returns the same dict (rank 0's, broadcast), because a launcher may hand back any
    rank's return value. A rank that raises takes the run down: torchrun stops the others, and a rank
    left waiting on a silent peer gives up after ``timeout_s``. A rank that raises first writes its
    error to ``<checkpoint_dir>/_failures/rank<N>.txt`` (launchers cannot see the ranks' exceptions).
    """
    from sae_model.trainer import fit

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if use_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    dist.init_process_group("nccl" if use_gpu else "gloo", timeout=timedelta(seconds=timeout_s))
    try:
        result = fit(request, rank=rank, world_size=world_size)
        box = [result_summary(result) if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    except BaseException as exc:
        out = failures_dir(request.checkpoint_dir)
        out.mkdir(parents=True, exist_ok=True)
        last = traceback.format_exception(exc)[-1].strip()
        (out / f"rank{rank}.txt").write_text(f"rank {rank} of {world_size}: {last}", encoding="utf-8")
        raise
    finally:
        dist.destroy_process_group()
