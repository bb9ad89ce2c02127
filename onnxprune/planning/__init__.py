"""Step 4, plan: which channels each group keeps (plan.py), per-group ratios from a file
(ratios.py) or allocated from measured sensitivity (allocation.py)."""
