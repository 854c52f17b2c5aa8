"""An update's difference to the global model, worked chunk by chunk so that no transform ever
holds a float64 copy of a layer: its norm, and the model that a scaled, noised delta makes.

The global model is either arrays in memory or the aggregate's archive itself
(`AggregateLayers`), read chunk by chunk: a leaf whose participant loaded the global model in
place never holds a second copy of it."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from prefect_branchkey.bk_blocks.archive import AggregateLayers

# A global model to compare with: layers in memory, or an aggregate read from its archive.
GlobalModel = Sequence[np.ndarray] | AggregateLayers

# Elements per chunk (8 MB of float64 temporaries).
CHUNK = 1 << 20


def chunks(layer: np.ndarray) -> Iterator[np.ndarray]:
    """The layer's elements as flat views of CHUNK elements: the transforms work chunk by chunk,
    so their temporaries stay a few MB whatever the model's size."""
    flat = layer.reshape(-1)
    for start in range(0, flat.size, CHUNK):
        yield flat[start:start + CHUNK]


def layer_chunks(model: GlobalModel, index: int) -> Iterator[np.ndarray]:
    """Layer `index` of a global model as CHUNK-element chunks in C order, as `chunks` yields an
    update's, from memory or from its archive (each chunk valid until the next is asked for)."""
    return model.c_chunks(index, CHUNK) if isinstance(model, AggregateLayers) else chunks(model[index])


def delta_norm(parameters: Sequence[np.ndarray], global_model: GlobalModel | None) -> float:
    """The L2 norm of the update's difference to the global model (to a zero model when None),
    over every float layer, in float64, chunk by chunk."""
    total = 0.0
    for index, mine in enumerate(parameters):
        if mine.dtype.kind != "f":
            continue
        theirs = layer_chunks(global_model, index) if global_model is not None else None
        for a in chunks(mine):
            difference = np.subtract(a, next(theirs), dtype=np.float64) if theirs else a.astype(np.float64)
            total += float(np.dot(difference, difference))
    return math.sqrt(total)


def apply_delta(layer: np.ndarray, bases: Iterator[np.ndarray] | None, scale: float, noise_std: float,
                rng: np.random.Generator) -> np.ndarray:
    """`base + scale * (layer - base) + N(0, noise_std^2)`, in the layer's dtype (`bases`, the
    base layer's CHUNK-element chunks, None: a zero model), written into one new array chunk by
    chunk."""
    out = np.empty(layer.shape, layer.dtype)
    noise_dtype = np.float64 if layer.dtype == np.float64 else np.float32
    for mine, target in zip(chunks(layer), chunks(out), strict=True):
        reference = next(bases) if bases is not None else None
        delta: npt.NDArray[np.floating[Any]] = (mine.astype(noise_dtype) if reference is None
                                                else np.subtract(mine, reference, dtype=noise_dtype))
        delta *= scale
        delta += noise_std * rng.standard_normal(delta.shape, dtype=noise_dtype)
        if reference is not None:
            delta += reference
        target[...] = delta
    return out
