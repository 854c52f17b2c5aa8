"""What happens to an update between `train()` and the upload: the guard, differential privacy,
deltas and the upload precision."""
