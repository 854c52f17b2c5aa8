"""Model adapters: parameters as an ordered list of numpy arrays, and back.

The order is the update's `layer_0 .. layer_n`, so it must be the same on every leaf
and every round: for PyTorch it is the module's `state_dict()` order (parameters and
buffers, e.g. a batch-norm's running stats and its integer counter), which PyTorch keeps
stable for a given architecture.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from prefect_branchkey.bk_blocks.errors import BranchKeyError


class ShapeMismatchError(BranchKeyError, ValueError):
    """Parameters that do not fit the model they are loaded into."""


def assign_parameters(target: list[np.ndarray], parameters: Sequence[np.ndarray]) -> None:
    """Copy `parameters` into `target` in place, refusing any count, shape or dtype mismatch."""
    if len(target) != len(parameters):
        raise ShapeMismatchError(f"model has {len(target)} parameter arrays, got {len(parameters)}")
    for index, (mine, theirs) in enumerate(zip(target, parameters, strict=True)):
        if mine.shape != theirs.shape:
            raise ShapeMismatchError(f"layer_{index}: model shape {mine.shape}, got {theirs.shape}")
        mine[...] = theirs


def torch_to_numpy(module: Any) -> list[np.ndarray]:
    """A PyTorch module's state (parameters and buffers) as numpy arrays, in `state_dict()` order."""
    return [tensor.detach().cpu().numpy().copy() for tensor in module.state_dict().values()]


def numpy_to_torch(module: Any, parameters: Sequence[np.ndarray]) -> None:
    """Load numpy arrays into a PyTorch module's state, in `state_dict()` order, dtypes kept."""
    import torch

    state = module.state_dict()
    if len(state) != len(parameters):
        raise ShapeMismatchError(f"module has {len(state)} state tensors, got {len(parameters)} arrays")
    new_state = {}
    for index, ((name, tensor), array) in enumerate(zip(state.items(), parameters, strict=True)):
        if tuple(tensor.shape) != tuple(array.shape):
            raise ShapeMismatchError(f"layer_{index} ({name}): module shape {tuple(tensor.shape)}, got {array.shape}")
        new_state[name] = torch.from_numpy(np.ascontiguousarray(array)).to(dtype=tensor.dtype)
    module.load_state_dict(new_state)
