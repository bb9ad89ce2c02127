"""Linear algebra (rules/linear.py): Gemm and MatMul, plus Einsum, which has no channel rule."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import op, opt


@op("MatMul")
def matmul(attrs, inputs):
    return torch.matmul(inputs[0], inputs[1])


@op("Gemm")
def gemm(attrs, inputs):
    a, b, c = inputs[0], inputs[1], opt(inputs, 2)
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if attrs.get("transA", 0):
        a = a.t()
    if attrs.get("transB", 0):
        if alpha == 1.0 and beta == 1.0 and (c is None or c.shape == b.shape[:1]):
            return F.linear(a, b, c)  # the common Linear layer: one fused call
        b = b.t()
    if c is None:
        out = a @ b
        return out if alpha == 1.0 else out * alpha
    return torch.addmm(c, a, b, beta=beta, alpha=alpha)


@op("Einsum")
def einsum(attrs, inputs):
    return torch.einsum(attrs["equation"].replace(" ", ""), *inputs)
