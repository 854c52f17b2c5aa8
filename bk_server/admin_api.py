"""The operator's API: create federations, control runs, inspect branches.

Guarded by the admin token `serve` writes into the data dir; leaf tokens never work here.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from prefect_branchkey.bk_server.errors import BadRequest, Unauthorized
from prefect_branchkey.bk_server.platform import Platform


def require_admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> Platform:
    expected = f"Bearer {request.app.state.admin_token}"
    if not authorization or not hmac.compare_digest(authorization.encode(), expected.encode()):
        raise Unauthorized("admin API needs 'Authorization: Bearer <admin token>'")
    return request.app.state.platform


router = APIRouter(prefix="/admin/v1")
AdminDep = Annotated[Platform, Depends(require_admin)]


class FederationRequest(BaseModel):
    leaves: int = Field(ge=1, le=10_000, description="Number of leaves to create.")
    min_updates: int = Field(ge=1, description="Distinct leaves that close a round.")
    tree: str = Field(default="tree", min_length=1, max_length=200)
    branch: str = Field(default="main", min_length=1, max_length=200)
    quorum: int | None = Field(default=None, ge=1, description="Leaves enough to close a round at its deadline.")
    round_deadline_s: float | None = Field(default=None, gt=0,
                                           description="Seconds after which a round with a quorum closes.")


@router.post("/federations", status_code=201)
async def create_federation(body: FederationRequest, platform: AdminDep) -> JSONResponse:
    tree_id, branch_id, credentials = await anyio.to_thread.run_sync(
        lambda: platform.create_federation(
            leaves=body.leaves, min_updates=body.min_updates, tree_name=body.tree, branch_name=body.branch,
            quorum=body.quorum, round_deadline_s=body.round_deadline_s,
        )
    )
    return JSONResponse(
        {"data": {"tree_id": tree_id, "branch_id": branch_id, "leaves": [c.as_json() for c in credentials]}},
        status_code=201,
    )


@router.post("/branches/{branch_id}/run/{action}")
async def control_run(branch_id: str, action: str, platform: AdminDep) -> dict[str, Any]:
    branch = await anyio.to_thread.run_sync(platform.set_run_status, branch_id, action)
    return {"data": {"run_status": branch.run_status, "run_number": branch.run_number, "round": branch.round}}


@router.get("/branches/{branch_id}")
def branch_status(branch_id: str, platform: AdminDep) -> dict[str, Any]:
    return {"data": platform.branch_status(branch_id)}


@router.get("/branches")
def list_branches(platform: AdminDep) -> dict[str, Any]:
    return {"data": [platform.branch_config(b)["branch"] for b in platform.store.branches()]}


@router.put("/branches/{branch_id}/fields")
async def assign_field_operations(branch_id: str, request: Request, platform: AdminDep) -> dict[str, Any]:
    """Assign the operations that combine the branch's named analytics fields: `{"fields": {"n": "sum", ...}}`."""
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("body must be JSON text: {\"fields\": {\"<field>\": \"<operation>\"}}") from None
    fields = body.get("fields") if isinstance(body, dict) else None
    assigned = await anyio.to_thread.run_sync(platform.set_field_operations, branch_id, fields)
    return {"data": {"fields": assigned}}
