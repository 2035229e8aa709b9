"""Saving, logging and loading trained models: the small public API that ``pipelines/`` uses.

A saved model is a directory with ``model.json`` (the spec) and ``weights.pt`` (a state dict read
back with ``torch.load(weights_only=True)``, so loading never unpickles arbitrary objects). In
MLflow it is a pyfunc model carrying that directory as an artefact; its ``predict`` returns codes.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae_model.model import StackedAutoencoder

log = logging.getLogger(__name__)

SPEC_FILE = "model.json"
WEIGHTS_FILE = "weights.pt"


def save_model(model: StackedAutoencoder, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to directory ``path`` (created): its spec as JSON (with ``extra`` merged in) and its
    weights as a CPU state dict via ``torch.save``. Returns ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    spec = dict(model.spec(), **(extra or {}))
    (path / SPEC_FILE).write_text(json.dumps(spec, indent=2), encoding="utf-8")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, path / WEIGHTS_FILE)
    return path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> StackedAutoencoder:
    """The model saved by ``save_model`` in ``path``, on ``device``, in eval mode. Raises FileNotFoundError
    when the spec or weights file is missing."""
    path = Path(path)
    if not (path / SPEC_FILE).exists() or not (path / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"{path}: not a saved model (expected {SPEC_FILE} and {WEIGHTS_FILE})")
    spec = json.loads((path / SPEC_FILE).read_text(encoding="utf-8"))
    model = StackedAutoencoder.from_spec(spec)
    state = torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval()


def _tensor(x: np.ndarray) -> torch.Tensor:
    """A tensor over ``x`` without a copy. Arrow hands Spark batches over read-only; the model
    only reads its input, so torch's warning about non-writable arrays does not apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(x)


class Encoder:
    """A loaded model for scoring: numpy float32 rows in, codes (or a hidden layer) out."""

    def __init__(self, model: StackedAutoencoder, device: str = "cpu") -> None:
        self.model = model.to(device).eval()
        self.device = torch.device(device)

    @property
    def input_width(self) -> int:
        return self.model.input_width

    @property
    def code_width(self) -> int:
        return self.model.code_width

    def layer_width(self, layer: int = -1) -> int:
        """Width of ``layers[layer]`` (-1: the code)."""
        return self.model.layers[-1 if layer == -1 else layer]

    @torch.inference_mode()
    def encode(self, x: np.ndarray, layer: int = -1, batch_size: int = 65536) -> np.ndarray:
        """Codes of ``x`` (float32 array (n, input_width)) as a float32 array (n, width of ``layer``),
        ``layer`` -1 being the code, in batches of ``batch_size`` rows. Raises ValueError when ``x`` is not
        2-D of the input width."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.input_width:
            raise ValueError(f"expected rows of width {self.input_width}, got an array of shape {x.shape}")
        out = np.empty((x.shape[0], self.layer_width(layer)), dtype=np.float32)
        for start in range(0, x.shape[0], batch_size):
            xb = _tensor(x[start : start + batch_size]).to(self.device)
            out[start : start + batch_size] = self.model.encode(xb, layer).float().cpu().numpy()
        return out

    @torch.inference_mode()
    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        """The model's reconstruction of ``x`` (float32 array (n, input_width)) as a float32 array of the same
        shape, in one batch."""
        xb = _tensor(np.asarray(x, dtype=np.float32)).to(self.device)
        return self.model(xb).float().cpu().numpy()


# ---------------------------------------------------------------- MLflow

try:  # the pyfunc wrapper needs mlflow; the model itself does not
    import mlflow.pyfunc

    # predict() deliberately has no type hints: MLflow would read them as an input schema.
    warnings.filterwarnings("ignore", message="Add type hints to the `predict` method")

    class SAEPyfunc(mlflow.pyfunc.PythonModel):
        """MLflow pyfunc: ``predict`` takes rows of features, returns their codes."""

        def load_context(self, context: Any) -> None:
            self.encoder = Encoder(load_model(context.artifacts["model_dir"]))

        def predict(self, context, model_input, params=None):  # noqa: ANN001 - MLflow reads type hints as a schema
            layer = int((params or {}).get("layer", -1))
            if hasattr(model_input, "to_numpy"):
                model_input = model_input.to_numpy()
            x = np.asarray(model_input)
            if x.dtype == object:  # one column holding arrays (e.g. from spark_udf on array<float>)
                x = np.stack([np.asarray(v, dtype=np.float32) for v in x.reshape(-1)])
            return self.encoder.encode(x.astype(np.float32, copy=False), layer=layer)

except ImportError:  # pragma: no cover - mlflow is a hard dependency of the project
    SAEPyfunc = None  # type: ignore[assignment,misc]


def pip_requirements() -> list[str]:
    """The logged model's pip requirements, pinned to what is installed: what MLflow's own inference
    finds for this pyfunc (mlflow, cloudpickle, numpy and this package, which brings torch), stated
    up front, because MLflow infers them by importing the model in a subprocess: ~3.5 s of every
    ``log_model`` (0.2 s without). A distribution that is not installed is left out."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("mlflow", "cloudpickle", "numpy", "sae-maps"):
        try:
            out.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return out


def log_model(
    model: StackedAutoencoder,
    name: str = "model",
    registered_model_name: str | None = None,
    input_example: np.ndarray | None = None,
) -> Any:
    """Log ``model`` to the active MLflow run; returns MLflow's ModelInfo (use its model_uri/version)."""
    import mlflow
    from mlflow.models import infer_signature

    if input_example is None:
        input_example = np.zeros((2, model.input_width), dtype=np.float32)
    input_example = np.asarray(input_example, dtype=np.float32)
    with torch.inference_mode():
        output = Encoder(model).encode(input_example)
    signature = infer_signature(input_example, output, params={"layer": -1})
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model(model, Path(tmp) / "sae")
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=SAEPyfunc(),
            artifacts={"model_dir": str(model_dir)},
            signature=signature,
            input_example=input_example,
            registered_model_name=registered_model_name or None,
            pip_requirements=pip_requirements(),
        )


def load_encoder(model_uri: str, device: str = "cpu") -> Encoder:
    """Load a logged model (``runs:/ID/model``, ``models:/NAME@ALIAS``, or a local saved-model dir)."""
    if Path(model_uri).is_dir() and (Path(model_uri) / SPEC_FILE).exists():
        return Encoder(load_model(model_uri), device=device)
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    found = [p.parent for p in local.rglob(SPEC_FILE)]
    if not found:
        raise FileNotFoundError(f"{model_uri}: no saved autoencoder ({SPEC_FILE}) among its artefacts")
    return Encoder(load_model(found[0]), device=device)
