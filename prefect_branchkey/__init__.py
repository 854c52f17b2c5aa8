"""prefect-branchkey: federated learning on the BranchKey platform as Prefect flows.

One import namespace whose subpackages are the repository's folders (`docs/architecture.md`):
`bk_blocks` (the Block, the client, the archive format), `tasks` (one retrying task per platform
step), `flows` (rounds, training, evaluation, statistics, simulation), `deployments` (edge
workers, the `bk` command line), and the development platform `bk_server` and `bk_dev`.

The names below are the public API, imported on first use so that `import prefect_branchkey`
costs nothing until one of them is asked for.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefect_branchkey.bk_blocks import BranchKeyCredentials, BranchKeyError
    from prefect_branchkey.flows.evaluation import federated_evaluation
    from prefect_branchkey.flows.leaf.promotion import PromotionSettings
    from prefect_branchkey.flows.leaf.retention import RetentionSettings
    from prefect_branchkey.flows.participant import Participant
    from prefect_branchkey.flows.publishing.registry import MlflowRegistry
    from prefect_branchkey.flows.round import federated_round
    from prefect_branchkey.flows.statistics import federated_statistics
    from prefect_branchkey.flows.training import federated_training
    from prefect_branchkey.flows.updates.privacy import PrivacySettings
    from prefect_branchkey.flows.updates.transforms import UpdateSettings

__version__ = version("prefect-branchkey")

_PUBLIC = {
    "BranchKeyCredentials": "prefect_branchkey.bk_blocks",
    "BranchKeyError": "prefect_branchkey.bk_blocks",
    "Participant": "prefect_branchkey.flows.participant",
    "MlflowRegistry": "prefect_branchkey.flows.publishing.registry",
    "federated_round": "prefect_branchkey.flows.round",
    "federated_training": "prefect_branchkey.flows.training",
    "federated_evaluation": "prefect_branchkey.flows.evaluation",
    "federated_statistics": "prefect_branchkey.flows.statistics",
    "UpdateSettings": "prefect_branchkey.flows.updates.transforms",
    "PrivacySettings": "prefect_branchkey.flows.updates.privacy",
    "PromotionSettings": "prefect_branchkey.flows.leaf.promotion",
    "RetentionSettings": "prefect_branchkey.flows.leaf.retention",
}


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use."""
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BranchKeyCredentials",
    "BranchKeyError",
    "MlflowRegistry",
    "Participant",
    "PrivacySettings",
    "PromotionSettings",
    "RetentionSettings",
    "UpdateSettings",
    "__version__",
    "federated_evaluation",
    "federated_round",
    "federated_statistics",
    "federated_training",
]
