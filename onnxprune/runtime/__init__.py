"""onnxruntime: sessions (session.py), verification of a written model against the original
(verify.py), side-by-side latency (bench.py) and channel multiples per provider (hardware.py)."""
