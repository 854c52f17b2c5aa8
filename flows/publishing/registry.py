"""The global model in MLflow's model registry (the `mlflow` extra), off the round's path.

Each round whose global model the leaf promotes (its history row says `served`) becomes a version
of a registered model named by the branch (or the Block's `model_name`), with the round, the
aggregation, branch and tree, the updates aggregated, the DP settings and epsilon, the leaf's
evaluation metrics and the Prefect flow run's URL as tags, params and metrics; the alias (by
default `champion`) moves to it. Invariants:

- The round never waits for MLflow, and staging never fails it. The round only stages the model's
  files in `work_dir/registry/<aggregation id>/` (the participant's `export_model` files, else a
  hard link to the `.npz`, a copy where links are refused); the leaf's publication thread, after
  each publication attempt (whether or not Prefect took it), registers staged rounds in history
  order, and `registered.json` names the last round done. An unreachable registry leaves the rest
  pending: retried with the publication's back-off, one warning per round naming the cause, and
  caught up by any later run of the leaf. A refusal no retry changes (an invalid name, no
  registry behind the server) passes the round over with one warning, so later rounds still go.
- Idempotent per (aggregation id, leaf): the MLflow run and the model version carry a
  `branchkey.identity` tag (a digest of the two, so no name needs quoting in a search); a version
  that exists is never registered again, and a finished run is reused (a run a killed attempt left
  unfinished is marked failed and a new one made, so no version points at missing files).
  Registrations of one work dir take turns (a lock file).
- Each registration is a payload leaving the site: the leaf's audit trail records it before
  (destination, model, files with their sizes and digests, metrics) and confirms it after.
- The Block's password and token are unwrapped once into `RegistrySettings` (whose repr hides
  them) and reach MLflow only through the `branchkey-registry` request-auth provider
  (`prefect_branchkey.flows.publishing.mlflow_auth`), which adds them to the registration's own
  requests for the tracking server: never in the environment, a log line, a tag, or an exception
  message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect.blocks.core import Block
from pydantic import ConfigDict, Field, SecretStr

from prefect_branchkey.bk_blocks.errors import require_extra
from prefect_branchkey.bk_blocks.files import atomic_write, exclusively, sha256_file
from prefect_branchkey.flows.leaf.audit import AuditTrail, public_url
from prefect_branchkey.flows.leaf.history import file_round, history_files, rows_by_file

if TYPE_CHECKING:
    from mlflow import MlflowClient

REGISTRY_DIR = "registry"
MARKER = "registered.json"
LOCK = ".registered.lock"
TAG = "branchkey."
# MLflow's error codes that no retry changes: the round is passed over (with one warning).
FINAL_CODES = frozenset({"INVALID_PARAMETER_VALUE", "ENDPOINT_NOT_FOUND", "FEATURE_DISABLED"})
# MLflow's own knobs, set while a registration runs (none is a secret): the request-auth provider
# that adds the Block's credentials, and one bounded attempt per request, not MLflow's default of 7
# retries over minutes.
_ENVIRONMENT = ("MLFLOW_TRACKING_AUTH", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")
_ENVIRONMENT_LOCK = threading.Lock()

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistrySettings:
    """Where and as what the leaf registers its promoted global models: plain values, the secrets
    kept out of the repr."""

    tracking_uri: str
    model_name: str | None = None
    alias: str = "champion"
    experiment: str | None = None
    timeout_s: float = 10.0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    def name_for(self, branch_name: str) -> str:
        """The registered model's name: the Block's, else the branch's."""
        return self.model_name or branch_name

    def experiment_for(self, branch_name: str) -> str:
        """The MLflow experiment the registration runs go into."""
        return self.experiment or f"branchkey-{self.name_for(branch_name)}"


class MlflowRegistry(Block):
    """An MLflow tracking server with a model registry, where a leaf registers each global model it
    promotes (the `mlflow` extra). Pass the Block's name as the flows' `registry` parameter.

    Example:
        ```python
        from prefect_branchkey.flows.publishing.registry import MlflowRegistry

        MlflowRegistry(tracking_uri="https://mlflow.hospital.example", username="fl-site",
                       password="...").save("site-registry")
        ```
    """

    model_config = ConfigDict(hide_input_in_errors=True)

    _block_type_name = "BranchKey MLflow Registry"
    _block_type_slug = "branchkey-mlflow-registry"
    _documentation_url = "https://github.com/branchkey/prefect-branchkey#readme"  # type: ignore[assignment]
    _description = "An MLflow model registry that receives each global model a BranchKey leaf promotes."

    tracking_uri: str = Field(description="The MLflow tracking server, e.g. https://mlflow.example:5000.")
    model_name: str | None = Field(default=None, description="The registered model's name (default: the branch's).")
    alias: str = Field(default="champion", description="The alias that moves to each promoted version.")
    experiment: str | None = Field(default=None,
                                   description="The experiment of the registration runs (default: branchkey-<model>).")
    timeout_s: float = Field(default=10.0, ge=1, description="How long one request to MLflow may take, in seconds.")
    username: str | None = Field(default=None, description="HTTP basic auth user, if the server asks for one.")
    password: SecretStr | None = Field(default=None, description="HTTP basic auth password; a secret.")
    token: SecretStr | None = Field(default=None, description="A bearer token instead of user and password; a secret.")

    def settings(self) -> RegistrySettings:
        """The Block's values for a registration, its secrets unwrapped once."""
        return RegistrySettings(
            tracking_uri=self.tracking_uri, model_name=self.model_name, alias=self.alias, experiment=self.experiment,
            timeout_s=self.timeout_s, username=self.username,
            password=self.password.get_secret_value() if self.password else None,
            token=self.token.get_secret_value() if self.token else None)


def load_registry(name: str | None) -> RegistrySettings | None:
    """The settings of the `MlflowRegistry` Block `name` (None: no registry); checks the extra first."""
    if not name:
        return None
    require_extra("Registering global models in MLflow", "mlflow", "mlflow")
    block = MlflowRegistry.load(name)
    return block.settings() if isinstance(block, MlflowRegistry) else None


def staged_dir(work_dir: Path, aggregation_id: str) -> Path:
    """Where a promoted round's model files wait for the registry."""
    return Path(work_dir) / REGISTRY_DIR / aggregation_id


def stage_model(work_dir: Path, aggregation_id: str, model: Path, export: Callable[[Path, Path], None]) -> Path:
    """Stage a promoted global model for the registry: `export(model, directory)` (the participant's
    hook) may write framework-native files; when it writes none, the `.npz` is linked (copied where
    the file system refuses a link). Written under a temporary name and renamed, so a staged
    directory is always complete."""
    target = staged_dir(work_dir, aggregation_id)
    if target.is_dir():
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    export(model, partial)
    if not any(partial.iterdir()):
        try:
            os.link(model, partial / model.name)
        except OSError:
            shutil.copy2(model, partial / model.name)
    partial.rename(target)
    return target


def stage_promoted(work_dir: Path, aggregation_id: str, model: Path, export: Callable[[Path, Path], None],
                   leaf_name: str) -> None:
    """`stage_model` for the round flow: a failure (the participant's export raising, a full disk)
    is one warning, never the round's failure; that round is then not registered."""
    try:
        stage_model(work_dir, aggregation_id, model, export)
    except Exception as exc:
        shutil.rmtree(staged_dir(work_dir, aggregation_id).with_name(aggregation_id + ".partial"), ignore_errors=True)
        logger.warning("%s: the global model %s could not be staged for MLflow (%s: %s); the round completes and "
                       "this model is not registered", leaf_name, aggregation_id, type(exc).__name__, exc)


def registered_through(work_dir: Path) -> tuple[int, int, str]:
    """(run, round, history file name) of the last row registered or passed over (not promoted);
    (0, 0, "") for none. The file name tells a round's rows apart (`resynced`, `completed`)."""
    try:
        data = json.loads((Path(work_dir) / MARKER).read_text())
        return int(data["run_number"]), int(data["round"]), str(data["file"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0, 0, ""


def _mark_registered(work_dir: Path, path: Path) -> None:
    run_number, round_number = file_round(path)
    with atomic_write(Path(work_dir) / MARKER, "w") as handle:
        json.dump({"run_number": run_number, "round": round_number, "file": path.name}, handle)


class Registrar:
    """Registers a leaf's promoted rounds in order; one warning per round while MLflow fails."""

    def __init__(self, leaf_name: str, work_dir: Path, settings: RegistrySettings) -> None:
        self.leaf_name, self.work_dir, self.settings = leaf_name, Path(work_dir), settings
        self._warned: set[str] = set()

    def register_pending(self) -> bool:
        """Register every promoted round recorded after the marker; False when MLflow could not be
        reached or answered with a failure a retry may fix (the rest stay pending)."""
        with exclusively(self.work_dir / LOCK):
            done = registered_through(self.work_dir)
            files = [path for path in history_files(self.work_dir) if (*file_round(path), path.name) > done]
            rows = rows_by_file(files) if files else {}
            for index, path in enumerate(files):
                row = rows[path.name]
                if _promoted(row) and not self._register_one(row):
                    self._warn_pending([rows[later.name] for later in files[index + 1:]], row)
                    return False
                _mark_registered(self.work_dir, path)
                if _promoted(row):
                    shutil.rmtree(staged_dir(self.work_dir, row["aggregation_id"]), ignore_errors=True)
            return True

    def _register_one(self, row: dict[str, Any]) -> bool:
        """Register one promoted round: True when it is done or passed over for good."""
        aggregation_id = str(row["aggregation_id"])
        staged = staged_dir(self.work_dir, aggregation_id)
        if not staged.is_dir():
            logger.debug("%s: round %d's global model %s was not staged (the registry was configured after it, or "
                         "staging failed); it is not registered", self.leaf_name, row["round"], aggregation_id)
            return True
        try:
            version = register_version(self.settings, row, staged, AuditTrail(self.work_dir))
        except Exception as exc:
            final = getattr(exc, "error_code", None) in FINAL_CODES
            self._warn(row, exc, final)
            return final
        logger.info("%s: round %d's global model registered as %s version %s (alias %s)", self.leaf_name,
                    row["round"], self.settings.name_for(_branch(row)), version, self.settings.alias)
        return True

    def _warn(self, row: dict[str, Any], exc: Exception, final: bool) -> None:
        """One warning per round naming the cause (later failures of the same round: debug lines)."""
        aggregation_id = str(row["aggregation_id"])
        level = logging.DEBUG if aggregation_id in self._warned and not final else logging.WARNING
        self._warned.add(aggregation_id)
        what = ("MLflow refused it for good, so it is passed over" if final else
                "the round is complete, and registration is retried in the background")
        logger.log(level, "%s: round %d's global model %s is not registered in MLflow yet (%s); %s", self.leaf_name,
                   row["round"], aggregation_id, _safe(cause(exc, self.settings.tracking_uri), self.settings), what)

    def _warn_pending(self, later: list[dict[str, Any]], blocking: dict[str, Any]) -> None:
        """Say once of each later promoted round that it waits too (behind `blocking`)."""
        for row in later:
            if _promoted(row) and row["aggregation_id"] not in self._warned:
                self._warned.add(str(row["aggregation_id"]))
                logger.warning("%s: round %d's global model %s is not registered in MLflow yet (it waits behind round "
                               "%d's); the round is complete, and registration is retried in the background",
                               self.leaf_name, row["round"], row["aggregation_id"], blocking["round"])


def _promoted(row: dict[str, Any]) -> bool:
    return bool(row["status"] == "completed" and row.get("served") and row.get("aggregation_id"))


def cause(exc: Exception, tracking_uri: str) -> str:
    """One line naming why MLflow did not take a registration: unreachable (and the socket's
    reason), or MLflow's own refusal (its error code and message), never a whole request dump."""
    text = str(getattr(exc, "message", None) or exc)
    unreachable = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text) or re.search(r"(Read timed out|timed out)", text)
    if unreachable or "Max retries exceeded" in text:
        reason = unreachable.group(1).strip() if unreachable else "no answer"
        return f"MLflow at {public_url(tracking_uri)} is unreachable: {reason}"
    code = getattr(exc, "error_code", None)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"{code or type(exc).__name__}: {first[:300]}"


def _branch(row: dict[str, Any]) -> str:
    return str(row.get("branch_name") or row["branch_id"])


def _safe(text: str, settings: RegistrySettings) -> str:
    """A message with the registry's secrets blanked out, should a library have echoed one."""
    for secret in (settings.password, settings.token):
        if secret:
            text = text.replace(secret, "***")
    return text


@contextmanager
def _mlflow_environment(settings: RegistrySettings) -> Iterator[None]:
    """MLflow's request settings for the duration (the process's own restored after), and the Block's
    credentials granted, in this thread alone, to requests for the tracking server."""
    from prefect_branchkey.flows.publishing.mlflow_auth import PROVIDER_NAME, authorization, granted

    header = authorization(settings.username, settings.password, settings.token)
    values = {"MLFLOW_TRACKING_AUTH": PROVIDER_NAME if header else None,
              "MLFLOW_HTTP_REQUEST_TIMEOUT": str(math.ceil(settings.timeout_s)),
              "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    with _ENVIRONMENT_LOCK, granted(settings.tracking_uri, header) if header else nullcontext():
        saved = {name: os.environ.get(name) for name in _ENVIRONMENT}
        try:
            _set_environment(values)
            yield
        finally:
            _set_environment(saved)


def _set_environment(values: Mapping[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def identity(aggregation_id: str, leaf_name: str) -> str:
    """The tag a registration of this aggregation by this leaf is found by (a hex digest: searchable
    without quoting whatever the names hold)."""
    return hashlib.sha256(f"{aggregation_id}\x00{leaf_name}".encode()).hexdigest()


def register_version(settings: RegistrySettings, row: dict[str, Any], staged: Path, trail: AuditTrail) -> str:
    """Register `row`'s staged model as a version (or find the one registered before) and move the
    alias to it, recorded in the leaf's audit trail; return the version."""
    from mlflow import MlflowClient

    name = settings.name_for(_branch(row))
    tags = version_tags(row)
    key = tags[TAG + "identity"]
    with _mlflow_environment(settings):
        client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
        version = _existing_version(client, name, key)
        if version is None:
            trail.sending("registration", key, _registration_facts(settings, name, row, staged))
            version = _new_version(client, settings, name, row, tags, staged)
        client.set_registered_model_alias(name, settings.alias, version)
    trail.confirmed("registration", key, {"model": name, "version": version, "alias": settings.alias})
    return version


def _registration_facts(settings: RegistrySettings, name: str, row: dict[str, Any], staged: Path) -> dict[str, Any]:
    """What a registration sends, for the audit trail: where, as what, which files and metrics."""
    files = [{"name": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path).hex()}
             for path in sorted(staged.rglob("*")) if path.is_file()]
    return {"destination": public_url(settings.tracking_uri), "model": name, "aggregation_id": row["aggregation_id"],
            "run_number": row["run_number"], "round": row["round"], "files": files, "metrics": dict(_metrics(row))}


def version_tags(row: dict[str, Any]) -> dict[str, str]:
    """What a version says of its round: the `branchkey.*` tags (`identity` finds it again)."""
    tags = {"identity": identity(str(row["aggregation_id"]), str(row["leaf_name"])),
            "aggregation_id": row["aggregation_id"], "leaf": row["leaf_name"], "branch_id": row["branch_id"],
            "branch_name": _branch(row), "tree_id": row.get("tree_id"), "run_number": row["run_number"],
            "round": row["round"], "updates_aggregated": row.get("updates_aggregated"),
            "upload_precision": row.get("upload_precision"), "dp_clip_norm": row.get("clip_norm"),
            "dp_noise_multiplier": row.get("noise_multiplier"), "dp_delta": row.get("dp_delta"),
            "dp_epsilon": row.get("dp_epsilon"), "primary_metric": row.get("primary_metric"),
            "prefect_flow_run_id": row.get("flow_run_id"), "prefect_flow_run_url": flow_run_url(row.get("flow_run_id"))}
    return {TAG + key: str(value) for key, value in tags.items() if value is not None}


def flow_run_url(flow_run_id: str | None) -> str | None:
    """The flow run's page in the Prefect UI (None without a run or a known UI)."""
    if not flow_run_id:
        return None
    from prefect.settings import get_current_settings

    ui_url = get_current_settings().ui_url
    return f"{str(ui_url).rstrip('/')}/runs/flow-run/{flow_run_id}" if ui_url else None


def _existing_version(client: MlflowClient, name: str, key: str) -> str | None:
    """The version of `name` already registered under this identity, if any."""
    found = client.search_model_versions(f"tags.`{TAG}identity` = '{key}'")
    return next((str(version.version) for version in found if version.name == name), None)


def _new_version(client: MlflowClient, settings: RegistrySettings, name: str, row: dict[str, Any],
                 tags: dict[str, str], staged: Path) -> str:
    """A run holding the model's files and the round's facts, then a version of `name` from it."""
    run_id = _registration_run(client, settings, row, tags, staged)
    _ensure_registered_model(client, name, _branch(row))
    version = client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id, tags=tags,
                                          description=_description(row))
    return str(version.version)


def _registration_run(client: MlflowClient, settings: RegistrySettings, row: dict[str, Any], tags: dict[str, str],
                      staged: Path) -> str:
    """The finished MLflow run of this aggregation and leaf: one an earlier attempt finished, or a new
    one (a run an attempt left unfinished is marked failed: its files may be missing)."""
    from mlflow.entities import Metric, Param

    experiment_name = settings.experiment_for(_branch(row))
    experiment = client.get_experiment_by_name(experiment_name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name)
    query = f"tags.`{TAG}identity` = '{tags[TAG + 'identity']}'"
    for earlier in client.search_runs([experiment_id], filter_string=query):
        if earlier.info.status == "FINISHED":
            return str(earlier.info.run_id)
        if earlier.info.status == "RUNNING":
            client.set_terminated(earlier.info.run_id, status="FAILED")
    run = client.create_run(experiment_id, tags=tags, run_name=f"{row['leaf_name']}-round-{row['round']}")
    run_id = str(run.info.run_id)
    params = [Param(key.removeprefix(TAG), value) for key, value in tags.items()]
    metrics = [Metric(name, float(value), 0, int(row["round"])) for name, value in _metrics(row)]
    client.log_batch(run_id, metrics=metrics, params=params)
    client.log_artifacts(run_id, str(staged), "model")
    client.set_terminated(run_id)
    return run_id


def _metrics(row: dict[str, Any]) -> Sequence[tuple[str, float]]:
    """The leaf's evaluation metrics of the round's global model, and the DP epsilon when noised."""
    metrics = [(f"eval_{name}", value) for name, value in sorted((row.get("eval_metrics") or {}).items())]
    return metrics + ([("dp_epsilon", row["dp_epsilon"])] if row.get("dp_epsilon") is not None else [])


def _ensure_registered_model(client: MlflowClient, name: str, branch: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name, tags={TAG + "branch_name": branch},
                                       description=f"Global models of the BranchKey branch {branch}.")


def _description(row: dict[str, Any]) -> str:
    return (f"Round {row['round']} of run {row['run_number']} of branch {_branch(row)}: aggregation "
            f"{row['aggregation_id']}, promoted by {row['leaf_name']}.")
