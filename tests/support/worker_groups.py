"""Which tests must share a pytest-xdist worker: those that share an instance of a module-scoped
fixture (a scenario run once for its module's tests, or files that tests read after others wrote
them). Grouped, the instance is made once; split, each worker would make its own.

Tests are joined when they use the same (module, fixture, parameter) instance, transitively; a
group's name is its first test's instance, so the name is stable from run to run. pytest-xdist
groups them only on pytest below 9.2 (pytest-dev/pytest-xdist#1386; the test extra pins it).
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

Instance = tuple[str, str, str]


def _instances(item: pytest.Item) -> list[Instance]:
    """The module-scoped fixture instances the test uses (directly or through other fixtures)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return []
    callspec = getattr(item, "callspec", None)
    found = []
    for name in info.names_closure:
        definitions = info.name2fixturedefs.get(name, ())
        if definitions and definitions[-1].scope == "module":
            param = callspec.params.get(name, "") if callspec is not None else ""
            found.append((item.nodeid.split("::")[0], name, str(param)))
    return found


def shared_fixture_groups(items: Sequence[pytest.Item]) -> dict[str, str]:
    """Map each grouped test's node id to its group's name (tests that share no instance are absent)."""
    parent: dict[Instance, Instance] = {}

    def root(instance: Instance) -> Instance:
        while parent.setdefault(instance, instance) != instance:
            instance = parent[instance]
        return instance

    uses = {item.nodeid: _instances(item) for item in items}
    for instances in uses.values():
        for other in instances[1:]:
            parent[root(other)] = root(instances[0])
    return {nodeid: _name(root(instances[0])) for nodeid, instances in uses.items() if instances}


def _name(instance: Instance) -> str:
    """`path::fixture` (`=param` when parametrized), without the `[`, `]` and `@` that pytest-xdist
    reads in node ids: it takes an `@` before a `]` for part of a test's parameters."""
    path, fixture, param = instance
    name = f"{path}::{fixture}" + (f"={param}" if param else "")
    return name.translate(str.maketrans("[]@", "(),"))
