"""The ONNX graph as a torch module, for gradients and training: module.py (TorchGraph, which
runs the compiled steps), compile.py (graph reading, constant folding, host/device placement,
scheduling), tensors.py (TensorProto <-> torch), and ops/ (the op table: one module of torch
implementations per op family, mirroring the rule table)."""
