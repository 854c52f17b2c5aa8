"""Federation-wide flows: a simulated federation on Dask, its client sampling, and a directory of leaves."""
