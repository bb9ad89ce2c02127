"""Step 5, cut: apply a plan to the graph (surgery.py) and export it (export.py), fold removed
channels into biases (compensate.py), record reshaped graph inputs/outputs (iochange.py),
renumber a decoder's KV cache after a depth cut (renumber.py), and zero single weights (sparsity.py)."""
