"""Step 2a, the graph: an onnx-graphsurgeon view the rules read (view.py), the exporter
spellings normalised on import (normalise.py), constant folding (fold.py), static shapes
(shapes.py) and shape arithmetic evaluated at made-up dims (shape_math.py)."""
