"""Step 1, load and save: read and check a model (load.py), the shapes of its graph inputs
(inputs.py), and write results atomically without ever touching an input (save.py)."""
