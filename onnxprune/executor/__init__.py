"""The ONNX graph as a torch module (module.py), for gradients and training; one module of
torch implementations per op family (ops/), mirroring the rule table."""
