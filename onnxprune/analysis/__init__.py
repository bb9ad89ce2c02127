"""Step 2b, analyse: channel groups found with the rule table (groups.py), the analysis of a
model as one object (analyse.py), and its parameter and MAC counts (stats.py)."""
