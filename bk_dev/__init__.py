"""Development tooling, never imported by the product: start a local bk-server, a Prefect
server on embedded PostgreSQL, and the demo federation (`make demo`)."""
