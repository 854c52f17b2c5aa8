"""Running leaves on edge machines: server set-up for `prefect deploy`, and `serve` for one machine."""
