"""The raw columns a test site holds, by seed: the same in the official client's venv and in the tests."""

import numpy as np


def columns(seed: int) -> dict:
    """An `age` column with a few NaN (omitted and counted) and an integer `visits` column."""
    rng = np.random.default_rng(seed)
    age = rng.normal(50.0 + 10 * seed, 12.0, size=40 + 7 * seed)
    age[rng.choice(age.size, size=seed + 1, replace=False)] = np.nan
    return {"age": age, "visits": rng.integers(0, 20, size=25 + seed).astype(np.int32)}
