"""The machinery under `Scan`: a private working copy of the user's model, folded and traced
copies for faster passes, the part of a network after a layer, incremental inference,
fixed batch sizes within a memory budget and switchable ReLU backward rules. Methods reach
it through `Scan`."""
