"""FedAvg computed the plain way, in float64 numpy: what every aggregate is checked against."""

from __future__ import annotations

import numpy as np


def fedavg_reference(updates: list[tuple[float, list[np.ndarray]]]) -> list[np.ndarray]:
    """FedAvg computed directly in numpy (float64), cast back like the protocol says."""
    total = sum(w for w, _ in updates)
    result = []
    for index, layer in enumerate(updates[0][1]):
        mean = sum(w / total * u[index].astype(np.float64) for w, u in updates)
        if layer.dtype.kind == "b":
            result.append(mean >= 0.5)
        elif layer.dtype.kind in "iu":
            result.append(np.rint(mean).astype(layer.dtype))
        else:
            result.append(mean.astype(layer.dtype))
    return result
