"""The machinery under `Scan`: a private working copy of the user's model, folded and traced
copies for faster passes, the part of a network after a layer, incremental inference,
measured batch sizes and switchable ReLU backward rules. Methods reach it through `Scan`."""
