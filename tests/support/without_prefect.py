"""Run a script as if Prefect were not installed: any import of `prefect` fails, as it would in
a venv without it. Usage: python -m tests.support.without_prefect SCRIPT [ARGS...]"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType


class _NoPrefect(MetaPathFinder):
    """Refuses every `prefect` module, so that importing one raises ModuleNotFoundError."""

    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if name == "prefect" or name.startswith("prefect."):
            raise ModuleNotFoundError(f"No module named {name!r} (Prefect is not installed)", name=name)
        return None


if __name__ == "__main__":
    sys.meta_path.insert(0, _NoPrefect())
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
