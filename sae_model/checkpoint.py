"""Atomic training checkpoints: tensors in a ``.pt`` read with ``weights_only=True``, the rest JSON.

Layout of a checkpoint directory::

    state-000012.pt   model + optimizer state dicts and RNG states (tensors, numbers, strings only)
    meta.json         which state file is current, stage/epoch, run id, loss history, ...

Each file is written to a temporary name and renamed into place; ``meta.json`` is replaced last,
so a kill at any moment leaves the previous checkpoint complete and current.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

META = "meta.json"


def _atomic_write_bytes(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(directory: str | Path, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write ``state`` (tensors/containers of tensors) and ``meta`` (JSON) as the current checkpoint."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    step = int(meta["step"])
    name = f"state-{step:06d}.pt"
    _atomic_write_bytes(d / name, lambda fh: torch.save(state, fh))
    meta = dict(meta, state_file=name)
    data = json.dumps(meta, indent=1, sort_keys=True).encode()
    _atomic_write_bytes(d / META, lambda fh: fh.write(data))
    for old in d.glob("state-*.pt"):  # keep only the current one
        if old.name != name:
            old.unlink(missing_ok=True)
    return d / name


def load_meta(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / META
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def load_checkpoint(directory: str | Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(state, meta)`` of the current checkpoint, or None; never unpickles arbitrary objects."""
    meta = load_meta(directory)
    if meta is None:
        return None
    state = torch.load(Path(directory) / meta["state_file"], map_location="cpu", weights_only=True)
    return state, meta


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
