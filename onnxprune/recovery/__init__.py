"""Step 6, recover: distillation and fine-tuning of the pruned graph in PyTorch (train.py)."""
