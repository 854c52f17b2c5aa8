"""The error tree drawn in `bk_blocks/errors.py` names every exception the product defines, in
the module that defines it: a reader looking for an error finds it there."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

from prefect_branchkey.bk_blocks import errors

PROJECT = Path(__file__).resolve().parents[2]
PRODUCT = ("bk_blocks", "tasks", "flows", "deployments")


def _defined_exceptions() -> dict[str, str]:
    """Every exception class the product defines, by name, with its module (without the namespace)."""
    found = {}
    for folder in PRODUCT:
        for path in sorted((PROJECT / folder).rglob("*.py")):
            module_name = ".".join(("prefect_branchkey", *path.relative_to(PROJECT).with_suffix("").parts))
            module = importlib.import_module(module_name)
            for name, value in vars(module).items():
                if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == module.__name__:
                    found[name] = module.__name__.removeprefix("prefect_branchkey.")
    return found


def _tree_lines() -> list[str]:
    assert errors.__doc__ is not None
    return errors.__doc__.splitlines()


def test_every_exception_is_named_in_the_tree() -> None:
    named = set(re.findall(r"\b[A-Z]\w+", errors.__doc__ or ""))
    assert sorted(set(_defined_exceptions()) - named) == []


def test_every_exception_above_the_client_is_listed_under_its_module() -> None:
    listed = {}
    for line in _tree_lines():
        match = re.match(r"\s+((?:flows|tasks|deployments)[\w.]*)\s+(.*)", line)
        if match:
            listed |= {name: match.group(1) for name in re.findall(r"\b[A-Z]\w+Error\b", match.group(2))}
    defined = {name: module for name, module in _defined_exceptions().items() if not module.startswith("bk_blocks")}
    misplaced = {name: (module, listed.get(name)) for name, module in defined.items()
                 if not (listed.get(name) and module.startswith(listed[name]))}
    assert misplaced == {}


def test_a_missing_extra_survives_pickling_with_its_one_line() -> None:
    import pickle

    error = errors.MissingExtraError("A simulated federation", "simulation",
                                     ModuleNotFoundError("No module named 'distributed'", name="distributed"))
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error) and again.extra == "simulation"
