"""Step 5, cut: apply a plan to the graph (surgery.py) and export it (export.py), fold removed
channels into biases (compensate.py), record reshaped graph inputs/outputs (iochange.py), and
zero single weights (sparsity.py)."""
