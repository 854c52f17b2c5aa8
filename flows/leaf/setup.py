"""What a leaf's flow works with, resolved once when the flow starts, before any round.

The round, training and evaluation flows share their leading parameters (credentials, work
dir, participant, promotion settings). `leaf_setup` turns them into the objects the rounds use,
so a bad value fails the run with a message naming it before the work dir is held or the
platform is asked anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect_branchkey.bk_blocks import BranchKeyCredentials
from prefect_branchkey.flows.leaf.promotion import PromotionPolicy, PromotionSettings, promotion_policy
from prefect_branchkey.flows.leaf.state import resolve_work_dir
from prefect_branchkey.flows.participant import Participant, load_participant
from prefect_branchkey.flows.publishing.assets import check_asset_keys
from prefect_branchkey.tasks import resolve_credentials


@dataclass(frozen=True)
class LeafSetup:
    """The leaf's credentials Block, its work dir on this machine, its participant and the
    deployment's promotion policy."""

    credentials: BranchKeyCredentials
    work_dir: Path
    participant: Participant
    promotion: PromotionPolicy


def leaf_setup(credentials: BranchKeyCredentials | str, work_dir: str, participant: str,
               participant_options: dict[str, Any] | None = None,
               promotion: PromotionSettings | None = None) -> LeafSetup:
    """Resolve the flow's leaf parameters: the Block (by value, name or `"$env"`), the work dir
    (`~` and `$VARIABLES` expanded here), the participant built with its options, the promotion
    policy; the leaf's asset keys are checked too, as Prefect would refuse them after the round."""
    block = resolve_credentials(credentials)
    directory = resolve_work_dir(work_dir)
    model = load_participant(participant, participant_options)
    policy = promotion_policy(model, promotion)
    check_asset_keys(block.tree_id, block.branch_id, block.leaf_id, block.leaf_name)
    return LeafSetup(block, directory, model, policy)
