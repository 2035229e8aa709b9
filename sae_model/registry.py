"""Model URIs: the one place that turns a model reference into a concrete model, its run and version.

Every command that takes a model (``sae infer``, ``sae evaluate``, the nightly publish step, the
tests) resolves it here, so an alias is read once and pinned (``models:/NAME@ALIAS`` becomes
``models:/NAME/VERSION``) and a reference that does not resolve always fails the same way: one
line that lists what the store does hold, never MLflow's traceback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"  # the model that serves: set by promotion, read by default
PREVIOUS_ALIAS = "previous"  # the champion before it, for `sae rollback`


class ModelURIError(ValueError):
    """A model URI names no model in the tracking store; the message lists what does exist."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference pinned on the driver: what executors load and what the tables record."""

    uri: str  # concrete: runs:/ID/..., models:/NAME/VERSION or models:/m-...
    run_id: str | None
    version: str | None
    local_dir: str | None = None  # artefacts downloaded once on the driver (local masters only)

    @property
    def load_uri(self) -> str:
        return self.local_dir or self.uri


def _what_exists(client: Any, name: str) -> str:
    """``versions: 1, 2; aliases: champion -> 2`` for registered model ``name``."""
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    aliases = getattr(client.get_registered_model(name), "aliases", {}) or {}
    alias_text = ", ".join(f"{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
    return f"versions: {', '.join(map(str, versions)) or 'none'}; aliases: {alias_text}"


def _registered_names(client: Any) -> str:
    names = sorted(m.name for m in client.search_registered_models())
    return ", ".join(names) or "none"


def _registered(client: Any, uri: str, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        raise ModelURIError(
            f"model URI {uri}: no registered model {name!r} (registered models: {_registered_names(client)})"
        ) from None


def _model_version(client: Any, uri: str, name: str, *, alias: str | None = None, version: str | None = None) -> Any:
    """Model version ``name`` @``alias`` or /``version``; ModelURIError naming what exists when absent."""
    from mlflow.exceptions import MlflowException

    _registered(client, uri, name)
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException:
        what = f"alias {alias!r}" if alias is not None else f"version {version!r}"
        raise ModelURIError(f"model URI {uri}: no {what}; model {name!r} has {_what_exists(client, name)}") from None


def _default(client: Any, registered_model: str, experiment: str) -> tuple[str, str | None, str | None]:
    """The registered model's @champion, else the newest model logged in ``experiment``."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(registered_model, CHAMPION_ALIAS)
        return f"models:/{registered_model}/{mv.version}", mv.run_id, str(mv.version)
    except MlflowException:
        pass
    exp = client.get_experiment_by_name(experiment)
    models = (
        client.search_logged_models(
            experiment_ids=[exp.experiment_id],
            order_by=[{"field_name": "creation_time", "ascending": False}],
            max_results=1,
        )
        if exp is not None
        else []
    )
    if not models:
        raise ModelURIError(
            f"no model to score with: registered model {registered_model!r} has no @{CHAMPION_ALIAS} alias and "
            f"experiment {experiment!r} has no logged model; train one (`sae train`) or set "
            "infer.model_uri=runs:/RUN_ID/model"
        )
    return f"models:/{models[0].model_id}", models[0].source_run_id, None


def resolve_model(
    model_uri: str = "",
    registered_model: str = "sae",
    experiment: str = "sae",
    download_to: str | None = None,
) -> ResolvedModel:
    """Pin ``model_uri`` to a concrete model in the active MLflow tracking store.

    Accepted: ``models:/NAME@ALIAS`` (becomes ``models:/NAME/VERSION``, so a concurrent re-alias
    cannot mix models), ``models:/NAME/VERSION``, ``models:/m-ID`` (a logged model),
    ``runs:/RUN_ID/PATH``, or a local directory holding a saved model. Empty ``model_uri``: the
    registered model's ``champion`` alias, else the newest model logged in ``experiment``. With
    ``download_to`` the artefacts are downloaded there once, so executors on this machine load from
    disk instead of each asking the tracking server.

    Raises ModelURIError (one line: what is missing and which versions and aliases exist) when the
    model, alias, version, logged model or run does not exist, or its artefacts cannot be found.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if model_uri and "://" not in model_uri and ":/" not in model_uri:
        if Path(model_uri).is_dir():
            found = _saved_model_dir(Path(model_uri))
            if found is None:
                raise ModelURIError(f"model URI {model_uri}: no saved autoencoder in this directory")
            return ResolvedModel(uri=model_uri, run_id=None, version=None, local_dir=str(found))
        raise ModelURIError(
            f"model URI {model_uri}: neither a directory nor a URI (use runs:/RUN_ID/model, "
            "models:/NAME/VERSION or models:/NAME@ALIAS)"
        )
    client = MlflowClient()
    run_id: str | None = None
    version: str | None = None
    uri = model_uri
    if not uri:
        uri, run_id, version = _default(client, registered_model, experiment)
    elif uri.startswith("models:/"):
        rest = uri[len("models:/") :].strip("/")
        name, _, alias = rest.partition("@")
        if alias:
            mv = _model_version(client, uri, name, alias=alias)
            uri, run_id, version = f"models:/{name}/{mv.version}", mv.run_id, str(mv.version)
        elif "/" in rest:
            name, ver = rest.rsplit("/", 1)
            mv = _model_version(client, uri, name, version=ver)
            run_id, version = mv.run_id, str(mv.version)
        else:
            try:
                run_id = client.get_logged_model(rest).source_run_id
            except MlflowException:
                raise ModelURIError(
                    f"model URI {uri}: no logged model {rest!r}; use models:/NAME/VERSION or models:/NAME@ALIAS "
                    f"(registered models: {_registered_names(client)})"
                ) from None
    elif uri.startswith("runs:/"):
        run_id = uri[len("runs:/") :].split("/", 1)[0]
        try:
            client.get_run(run_id)
        except MlflowException:
            raise ModelURIError(f"model URI {uri}: no run {run_id!r} in the tracking store") from None
    local_dir = None
    if download_to:
        found = _saved_model_dir(_download(uri, download_to))
        if found is None:
            raise ModelURIError(
                f"model URI {uri}: no saved autoencoder among its artefacts at {_location(client, uri)}; if the "
                "MLflow store was moved or copied without its mlartifacts/ folder, copy that folder beside mlflow.db"
            )
        local_dir = str(found)
    log.info("model %s -> %s (run %s, version %s)", model_uri or "(default)", uri, run_id, version)
    return ResolvedModel(uri=uri, run_id=run_id, version=version, local_dir=local_dir)


def _download(uri: str, dst: str) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst))
    except (MlflowException, OSError) as exc:
        raise ModelURIError(f"model URI {uri}: its artefacts cannot be read: {exc}") from None


def _location(client: Any, uri: str) -> str:
    """Where the store says ``uri``'s artefacts are (for the error message only)."""
    from mlflow.exceptions import MlflowException

    try:
        rest = uri.split(":/", 1)[1].strip("/")
        if uri.startswith("runs:/"):
            run_id, _, path = rest.partition("/")
            return f"{client.get_run(run_id).info.artifact_uri}/{path}"
        if "/" in rest:
            mv = client.get_model_version(*rest.rsplit("/", 1))
            return getattr(mv, "storage_location", None) or mv.source
        return client.get_logged_model(rest).artifact_location
    except (MlflowException, IndexError, TypeError):
        return "(unknown)"


def _saved_model_dir(root: Path) -> Path | None:
    """The directory under ``root`` holding a saved model, or None."""
    from sae_model.loading import SPEC_FILE

    found = sorted(p.parent for p in root.rglob(SPEC_FILE))
    return found[0] if found else None
