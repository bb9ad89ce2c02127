"""The bundled digits model: its architecture and its data split, importable.

``models/digits_cnn.onnx`` is ``DigitsCNN()`` trained by
``python -m tools.make_digits_model``. Accuracy benchmarks and tests import
this module (``from tools.digits_arch import load_split``) so that they use
the same split and the same preprocessing as the training script.

Data: scikit-learn's ``load_digits`` (1,797 8x8 grey images, pixel values
0..16, no download). Split: ``train_test_split(test_size=0.25,
random_state=0, stratify=y)`` -> 1,347 train / 450 held out. Preprocessing:
pixel / 16 as float32, shape (N, 1, 8, 8). The model takes that tensor as
input "input" and returns "logits" (N, 10).

Architecture (channels x height x width after each block), chosen so that the
pruner meets the patterns it must handle:

    stem      Conv3x3(1->16)  + BN + ReLU                        16x8x8
    expand    Conv3x3(16->32) + BN + ReLU                        32x8x8
    residual  Conv3x3(32->32) + BN + ReLU, Conv3x3(32->32) + BN,
              Add(skip = expand output), ReLU                    32x8x8   (residual Add couples 2 convs)
    pool      MaxPool 2x2                                        32x4x4
    depthwise Conv3x3(32->32, group=32) + BN + ReLU              32x4x4   (depthwise: passes channels through)
    pointwise Conv1x1(32->48) + BN + ReLU                        48x4x4
    grouped   Conv3x3(48->48, group=4) + BN + ReLU               48x4x4   (grouped conv: group count kept)
    SE        GlobalAvgPool -> Conv1x1(48->12) + ReLU
              -> Conv1x1(12->48) -> Sigmoid -> Mul               48x4x4   (squeeze-excite Mul)
    head      GlobalAvgPool -> Flatten -> Linear(48->10)         10

The legacy exporter folds every BatchNorm into its Conv (eval mode).
"""

from __future__ import annotations

import numpy as np

SPLIT = {"test_size": 0.25, "random_state": 0}
NUM_CLASSES = 10


def load_split():
    """(x_train, x_test, y_train, y_test): float32 (N, 1, 8, 8) in [0, 1], int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, stratify=y, **SPLIT)


def build_model():
    """A fresh (untrained) ``DigitsCNN``; torch is imported only here."""
    import torch
    from torch import nn

    def conv_bn(cin, cout, k=3, groups=1, relu=True):
        layers = [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if relu:
            layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    class SqueezeExcite(nn.Module):
        def __init__(self, channels, reduced):
            super().__init__()
            self.reduce = nn.Conv2d(channels, reduced, 1)
            self.expand = nn.Conv2d(reduced, channels, 1)

        def forward(self, x):
            s = torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))
            return x * torch.sigmoid(self.expand(s))

    class DigitsCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = conv_bn(1, 16)
            self.expand = conv_bn(16, 32)
            self.res1 = conv_bn(32, 32)
            self.res2 = conv_bn(32, 32, relu=False)
            self.pool = nn.MaxPool2d(2)
            self.depthwise = conv_bn(32, 32, groups=32)
            self.pointwise = conv_bn(32, 48, k=1)
            self.grouped = conv_bn(48, 48, groups=4)
            self.se = SqueezeExcite(48, 12)
            self.head = nn.Linear(48, NUM_CLASSES)

        def forward(self, x):
            x = self.expand(self.stem(x))
            x = torch.relu(x + self.res2(self.res1(x)))
            x = self.pool(x)
            x = self.grouped(self.pointwise(self.depthwise(x)))
            x = self.se(x)
            x = nn.functional.adaptive_avg_pool2d(x, 1)
            return self.head(torch.flatten(x, 1))

    return DigitsCNN()


def accuracy_onnx(path, x, y, providers=("CPUExecutionProvider",)) -> float:
    """Top-1 accuracy of an ONNX digits model with onnxruntime."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=list(providers))
    logits = sess.run(["logits"], {"input": x})[0]
    return float((logits.argmax(1) == y).mean())


def build_folded_model(onnx_path):
    """``DigitsCNN`` with the weights of the exported ONNX file, BatchNorm folded.

    The export folded every BatchNorm into its Conv, so the trained BN
    statistics are gone from the file. This rebuilds the native architecture
    with each BN replaced by ``nn.Identity`` and each Conv given the folded bias,
    then copies every Conv/Gemm weight and bias from the ONNX initializers
    (Conv nodes in graph order = the model's Conv2d modules in definition
    order; shapes are checked). The result computes what the ONNX model
    computes (eval and train mode alike: nothing is left that differs).
    """
    import onnx
    import torch
    from onnx import numpy_helper
    from torch import nn

    model = build_model()
    for block in model.modules():
        if isinstance(block, nn.Sequential) and isinstance(block[1], nn.BatchNorm2d):
            conv = block[0]
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
            block[1] = nn.Identity()
    onnx_model = onnx.load(str(onnx_path))
    weights = {t.name: numpy_helper.to_array(t) for t in onnx_model.graph.initializer}
    convs = [n for n in onnx_model.graph.node if n.op_type == "Conv"]
    modules = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    gemm = next(n for n in onnx_model.graph.node if n.op_type == "Gemm")
    if len(convs) != len(modules):
        raise ValueError(f"{onnx_path}: {len(convs)} Conv nodes, the architecture has {len(modules)} Conv2d")
    pairs = [(m, n) for m, n in zip(modules, convs)] + [(model.head, gemm)]
    with torch.no_grad():
        for module, node in pairs:
            for param, name in ((module.weight, node.input[1]), (module.bias, node.input[2])):
                value = torch.from_numpy(weights[name].copy())
                if tuple(value.shape) != tuple(param.shape):
                    raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(param.shape)}")
                param.copy_(value)
    return model.eval()


def main() -> None:
    """``python -m tools.digits_arch MODEL.onnx ...``: held-out top-1 of each digits model."""
    import argparse

    p = argparse.ArgumentParser(description="Top-1 accuracy of digits models on the 450 held-out test images.")
    p.add_argument("models", nargs="+")
    args = p.parse_args()
    _, x_test, _, y_test = load_split()
    for path in args.models:
        print(f"{path}: {accuracy_onnx(path, x_test, y_test):.2%} top-1 on {len(y_test)} held-out images")


if __name__ == "__main__":
    main()
