"""What Prefect shows of a leaf: artifacts, charts, events and asset materializations, published
off the round's path."""
