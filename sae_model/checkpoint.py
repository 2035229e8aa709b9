"""Atomic training checkpoints: tensors in a ``.pt`` read with ``weights_only=True``, the rest JSON.

Layout of a checkpoint directory::

    state-000012.pt   model + optimizer state dicts and RNG states (tensors, numbers, strings only)
    meta-000012.json  its stage/epoch, run id, loss history, ...
    meta.json         a copy of the current one's meta, naming its state file

Each file is written to a temporary name and renamed into place; ``meta.json`` is replaced last,
so a kill at any moment leaves the previous checkpoint complete and current. The previous
checkpoint is kept too: a state file damaged after it was written (a partial copy, a disk that
filled up under a file system that does not order writes) falls back to it, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

META = "meta.json"
KEEP = 2  # the current checkpoint and the one before it


class CheckpointError(RuntimeError):
    """No checkpoint in a directory can be read; the message names the damaged files."""


def _atomic_write_bytes(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(directory: str | Path, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write ``state`` (tensors/containers of tensors) and ``meta`` (JSON) as the current checkpoint;
    keep the one before it, remove older ones."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    step = int(meta["step"])
    name = f"state-{step:06d}.pt"
    _atomic_write_bytes(d / name, lambda fh: torch.save(state, fh))
    meta = dict(meta, state_file=name)
    data = json.dumps(meta, indent=1, sort_keys=True).encode()
    _atomic_write_bytes(d / f"meta-{step:06d}.json", lambda fh: fh.write(data))
    _atomic_write_bytes(d / META, lambda fh: fh.write(data))
    # Keep this step and the one before; a later step is left from a damaged checkpoint resumed past.
    steps = sorted({int(p.stem.split("-", 1)[1]) for p in d.glob("state-*.pt") if p.stem.split("-", 1)[1].isdigit()})
    keep = {x for x in steps if x <= step}
    keep = set(sorted(keep)[-KEEP:])
    for old in [*d.glob("state-*.pt"), *d.glob("meta-*.json")]:
        suffix = old.stem.split("-", 1)[1]
        if not suffix.isdigit() or int(suffix) not in keep:
            old.unlink(missing_ok=True)
    return d / name


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("checkpoint file %s is unreadable (%s); ignoring it", path, exc)
        return None


def _metas(d: Path) -> list[dict[str, Any]]:
    """Every checkpoint's meta in ``d``, newest first (``meta.json``'s own first when it reads)."""
    out = []
    current = _read_json(d / META) if (d / META).exists() else None
    if current is not None:
        out.append(current)
    for path in sorted(d.glob("meta-*.json"), reverse=True):
        meta = _read_json(path)
        if meta is not None and all(meta.get("state_file") != m.get("state_file") for m in out):
            out.append(meta)
    return sorted(out, key=lambda m: int(m.get("step", -1)), reverse=True)


def load_meta(directory: str | Path) -> dict[str, Any] | None:
    """The newest checkpoint's meta whose JSON reads, or None when there is no checkpoint."""
    metas = _metas(Path(directory))
    return metas[0] if metas else None


def load_checkpoint(directory: str | Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(state, meta)`` of the newest readable checkpoint, or None when there is none at all.

    A state file that cannot be read (truncated, corrupt, missing) is skipped with a warning naming
    it, and the checkpoint before it is used. Raises CheckpointError when checkpoints exist but none
    can be read. Never unpickles arbitrary objects (``weights_only=True``).
    """
    d = Path(directory)
    metas = _metas(d)
    if not metas and not any(d.glob("state-*.pt")):
        return None
    bad: list[str] = []
    for meta in metas:
        path = d / str(meta.get("state_file", ""))
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "model" not in state:
                raise ValueError("not a training checkpoint")
        except (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
            log.warning("checkpoint %s is unreadable (%s: %s); trying the one before it", path, type(exc).__name__, exc)
            bad.append(f"{path} ({type(exc).__name__})")
            continue
        if bad:
            log.warning("resuming from the older checkpoint %s (step %s) instead of %s", path, meta.get("step"), bad[0])
        return state, meta
    raise CheckpointError(f"no readable checkpoint in {d}: " + ", ".join(bad or [f"{d} (no meta.json)"]))


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """torch's CPU RNG state, plus ``device``'s CUDA RNG state on a CUDA device (uint8 tensors), for a
    checkpoint."""
    out = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore the RNG states ``rng_state`` saved; the CUDA state only on a CUDA device and when saved."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
