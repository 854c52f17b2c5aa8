"""The layering the code promises: one import namespace, the client needs no Prefect, each layer
imports only those below it, the product never imports the development platform, and one error
root."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from prefect_branchkey.bk_blocks.errors import BranchKeyError

PROJECT = Path(__file__).resolve().parents[2]
NAMESPACE = "prefect_branchkey"
# Lowest first: a package may import itself and the packages before it, never those after it.
LAYERS = ("bk_blocks", "tasks", "flows", "deployments")
DEV_ONLY = ("bk_server", "bk_dev")
FOLDERS = (*LAYERS, *DEV_ONLY)


def _imported_names(path: Path) -> set[str]:
    """The dotted names a module imports (absolute imports, at any depth of the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def _imported_packages(path: Path) -> set[str]:
    """The packages a module imports: ours by folder (`prefect_branchkey.flows` is `flows`), the
    rest by their top-level name."""
    return {name.split(".")[1] if name.startswith(f"{NAMESPACE}.") else name.split(".")[0]
            for name in _imported_names(path)}


def _modules(package: str) -> list[Path]:
    return sorted((PROJECT / package).rglob("*.py"))


def test_client_and_archive_import_no_prefect() -> None:
    code = ("import sys, json, prefect_branchkey.bk_blocks.client, prefect_branchkey.bk_blocks.archive, "
            "prefect_branchkey.bk_blocks.compat; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == "
            "'prefect' or m.startswith(('prefect_branchkey.bk_server', 'prefect_branchkey.bk_dev')))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


# The one exception: `bk simulate` without --host starts the development platform (as `make demo`
# does), importing it only then.
DEV_PLATFORM_USERS = {"deployments/cli.py": ["bk_dev"]}


@pytest.mark.parametrize("package", LAYERS)
def test_product_never_imports_the_development_platform(package: str) -> None:
    offenders = {str(path.relative_to(PROJECT)): sorted(_imported_packages(path) & set(DEV_ONLY))
                 for path in _modules(package)}
    offenders = {path: names for path, names in offenders.items() if names != DEV_PLATFORM_USERS.get(path)}
    assert {path: names for path, names in offenders.items() if names} == {}


@pytest.mark.parametrize("index", range(len(LAYERS)))
def test_each_layer_imports_only_the_layers_below_it(index: int) -> None:
    above = set(LAYERS[index + 1:])
    offenders = {str(path.relative_to(PROJECT)): sorted(_imported_packages(path) & above)
                 for path in _modules(LAYERS[index])}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_every_exception_the_product_defines_derives_from_one_root() -> None:
    strays = []
    for package in LAYERS:
        for path in _modules(package):
            module = importlib.import_module(".".join((NAMESPACE, *path.relative_to(PROJECT).with_suffix("").parts)))
            for name, value in vars(module).items():
                if (inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == module.__name__
                        and not issubclass(value, BranchKeyError)):
                    strays.append(f"{module.__name__}.{name}")
    assert strays == []


def _module_level_registries(path: Path) -> list[str]:
    """Module-level names bound to a mutable container (a dict, list or set display or call)."""
    found = []
    for node in ast.parse(path.read_text(), str(path)).body:
        targets, value = ([node.target], node.value) if isinstance(node, ast.AnnAssign) else (
            (node.targets, node.value) if isinstance(node, ast.Assign) else ([], None))
        mutable = isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)) or (
            isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
            and value.func.id in ("dict", "list", "set", "defaultdict", "OrderedDict"))
        if mutable:
            found += [f"{path.relative_to(PROJECT)}:{target.id}" for target in targets if isinstance(target, ast.Name)
                      and target.id != "__all__"]
    return found


@pytest.mark.parametrize("package", ("tasks", "flows"))
def test_tasks_and_flows_keep_no_module_level_registry(package: str) -> None:
    assert [name for path in _modules(package) for name in _module_level_registries(path)] == []


def _declared_distributions() -> set[str]:
    """Every distribution pyproject.toml names, in its dependencies or an optional extra."""
    project = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"],
                    *(r for extra in project["optional-dependencies"].values() for r in extra)]
    return {re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")
            for requirement in requirements}


def test_every_package_imported_directly_is_declared() -> None:
    ours = set(FOLDERS) | {NAMESPACE} | {path.stem for path in _modules("bench")}
    distributions = packages_distributions()
    imported = {name for package in (*FOLDERS, "bench") for path in _modules(package)
                for name in _imported_packages(path)} - ours - set(sys.stdlib_module_names)
    undeclared = {name: distributions.get(name) for name in imported
                  if not ({d.lower().replace("_", "-") for d in distributions.get(name, [name])}
                          & _declared_distributions())}
    assert undeclared == {}


@pytest.mark.parametrize("folder", (*FOLDERS, "bench", "tests"))
def test_our_modules_are_imported_only_through_the_namespace(folder: str) -> None:
    """A bare `import flows` would find a user's own `flows/` package (or ours only from this checkout)."""
    bare = {str(path.relative_to(PROJECT)): sorted(name for name in _imported_names(path)
                                                   if name.split(".")[0] in FOLDERS)
            for path in _modules(folder)}
    assert {path: names for path, names in bare.items() if names} == {}


def test_every_package_folder_is_in_the_wheel() -> None:
    """pyproject.toml lists each package (and maps each folder): a folder missing there would be
    missing from the wheel while every test here still imports it from the checkout."""
    setuptools = tomllib.loads((PROJECT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {".".join((NAMESPACE, *init.parent.relative_to(PROJECT).parts))
               for folder in FOLDERS for init in (PROJECT / folder).rglob("__init__.py")}
    assert folders | {NAMESPACE} == set(setuptools["packages"])
    assert setuptools["package-dir"] == {NAMESPACE: NAMESPACE, **{f"{NAMESPACE}.{f}": f for f in FOLDERS}}
