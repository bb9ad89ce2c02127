"""Step by step: the steps of the flow as plain functions (steps.py), and the pipelines that compose them:
one prune (prune.py), each group cut alone (sensitivity.py), the ratio that meets a budget (target.py),
rounds with recovery (rounds.py) and the whole job on a file (run.py)."""
