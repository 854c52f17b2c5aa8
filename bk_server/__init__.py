"""bk-server: a local BranchKey-compatible platform for development, tests and the demo (the `server` extra)."""

from prefect_branchkey.bk_blocks.errors import require_extra

require_extra("bk-server", "server", "fastapi", "starlette", "uvicorn", "anyio")
