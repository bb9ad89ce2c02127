"""onnxruntime's contrib ops (rules/contrib.py) and the standard ops of opset 23 that do the same:
RMSNorm (SimplifiedLayerNormalization, RMSNormalization), the Skip* normalisations, the fused
Gelus, attention (com.microsoft Attention and MultiHeadAttention, the standard Attention) and
BERT's EmbedLayerNormalization. Keys of com.microsoft ops carry their domain
("com.microsoft.Attention"), as in the rule table.

Semantics follow onnxruntime's contrib op documents (ContribOperators.md); masked positions get
``mask_filter_value`` (-10000, onnxruntime's default) added before the softmax, as there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...errors import UnsupportedModel
from .registry import Tensor, op, opt

MS = "com.microsoft"
MASK_FILTER = -10000.0


# --- normalisations -----------------------------------------------------------------------------

def _rms_norm(x: Tensor, scale: Tensor, axis: int, eps: float) -> tuple[Tensor, Tensor]:
    dims = tuple(range(axis % x.ndim, x.ndim))
    inv = torch.rsqrt(x.float().pow(2).mean(dims, keepdim=True) + eps)
    return (x.float() * inv).to(x.dtype) * scale, inv


@op("SimplifiedLayerNormalization", "RMSNormalization")
def rms_norm(attrs, inputs):
    y, inv = _rms_norm(inputs[0], inputs[1], attrs.get("axis", -1), attrs.get("epsilon", 1e-5))
    return y if attrs["_num_outputs"] == 1 else (y, inv)


def _skip_sum(inputs: list, bias_at: int) -> Tensor:
    s = inputs[0] + inputs[1]
    bias = opt(inputs, bias_at)
    return s if bias is None else s + bias


@op(f"{MS}.SkipLayerNormalization")
def skip_layer_norm(attrs, inputs):
    s = _skip_sum(inputs, 4)
    gamma, beta, eps = inputs[2], opt(inputs, 3), attrs.get("epsilon", 1e-12)
    y = F.layer_norm(s, s.shape[-1:], gamma, beta, eps)
    if attrs["_num_outputs"] == 1:
        return y
    var, mean = torch.var_mean(s.float(), -1, correction=0, keepdim=True)
    return (y, mean, torch.rsqrt(var + eps), s)[: attrs["_num_outputs"]]


@op(f"{MS}.SkipSimplifiedLayerNormalization")
def skip_rms_norm(attrs, inputs):
    s = _skip_sum(inputs, 3)
    y, inv = _rms_norm(s, inputs[2], -1, attrs.get("epsilon", 1e-12))
    if attrs["_num_outputs"] == 1:
        return y
    return (y, torch.zeros_like(inv), inv, s)[: attrs["_num_outputs"]]


@op(f"{MS}.EmbedLayerNormalization")
def embed_layer_norm(attrs, inputs):
    ids, segments, words, positions = inputs[0], opt(inputs, 1), inputs[2], inputs[3]
    segment_table, gamma, beta = opt(inputs, 4), inputs[5], opt(inputs, 6)
    mask, position_ids = opt(inputs, 7), opt(inputs, 8)
    if position_ids is None:
        position_ids = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape)
    s = words[ids.long()] + positions[position_ids.long()]
    if segments is not None and segment_table is not None:
        s = s + segment_table[segments.long()]
    y = F.layer_norm(s, s.shape[-1:], gamma, beta, attrs.get("epsilon", 1e-12))
    lengths = (mask.to(torch.int32).sum(1) if mask is not None
               else torch.zeros(ids.shape[0], dtype=torch.int32, device=ids.device))
    return (y, lengths, s)[: attrs["_num_outputs"]]


# --- fused activations ---------------------------------------------------------------------------

@op(f"{MS}.BiasGelu", f"{MS}.Gelu")
def bias_gelu(attrs, inputs):
    x = inputs[0] if opt(inputs, 1) is None else inputs[0] + inputs[1]
    return F.gelu(x)


@op(f"{MS}.FastGelu")
def fast_gelu(attrs, inputs):
    x = inputs[0] if opt(inputs, 1) is None else inputs[0] + inputs[1]
    return F.gelu(x, approximate="tanh")


@op(f"{MS}.QuickGelu")
def quick_gelu(attrs, inputs):
    x = inputs[0]
    return x * torch.sigmoid(attrs.get("alpha", 1.702) * x)


# --- attention -------------------------------------------------------------------------------------

def _heads(x: Tensor, heads: int) -> Tensor:
    """(batch, sequence, heads x size) -> (batch, heads, sequence, size)."""
    b, s, _ = x.shape
    return x.reshape(b, s, heads, -1).transpose(1, 2)


def _merge(y: Tensor) -> Tensor:
    b, h, s, d = y.shape
    return y.transpose(1, 2).reshape(b, s, h * d)


def _attend(q, k, v, scale: float | None, bias: Tensor | None, causal: bool) -> Tensor:
    """softmax(q k^T * scale + bias [+ causal mask]) v on (batch, heads, sequence, size)."""
    scores = q @ k.transpose(-1, -2) * (1 / math.sqrt(q.shape[-1]) if not scale else scale)
    if bias is not None:
        scores = scores + bias
    if causal:
        s, t = scores.shape[-2:]
        future = torch.ones(s, t, dtype=torch.bool, device=q.device).triu(t - s + 1)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, -1) @ v


def _key_mask(mask: Tensor | None, batch: int, queries: int, keys: int, fill: float) -> Tensor | None:
    """onnxruntime's mask forms as an additive bias (batch, 1, queries, keys): key lengths
    (batch,), a raw 0/1 mask (batch, keys) or (batch, queries, keys)."""
    if mask is None:
        return None
    if mask.ndim == 1:
        valid = torch.arange(keys, device=mask.device)[None, :] < mask[:batch, None]
        return torch.where(valid, 0.0, fill)[:, None, None, :]
    if mask.ndim == 2:
        return ((1 - mask.float()) * fill)[:, None, None, :]
    if mask.ndim == 3:
        return ((1 - mask.float()) * fill)[:, None]
    raise UnsupportedModel(f"a mask of rank {mask.ndim} is not implemented in the PyTorch executor")


def _no_cache(name: str, inputs: list, positions) -> None:
    if any(opt(inputs, i) is not None for i in positions):
        raise UnsupportedModel(f"{name} with a KV cache is not implemented in the PyTorch executor")


@op(f"{MS}.Attention")
def packed_attention(attrs, inputs):
    _no_cache("Attention", inputs, (4, 6))
    x, w, b = inputs[0], inputs[1], opt(inputs, 2)
    heads, fill = attrs["num_heads"], attrs.get("mask_filter_value", MASK_FILTER)
    qkv = x @ w if b is None else x @ w + b
    sizes = attrs.get("qkv_hidden_sizes") or [w.shape[1] // 3] * 3
    q, k, v = (_heads(t, heads) for t in torch.split(qkv, list(sizes), -1))
    bias = _key_mask(opt(inputs, 3), x.shape[0], x.shape[1], x.shape[1], fill)
    extra = opt(inputs, 5)
    if extra is not None:
        bias = extra if bias is None else bias + extra
    y = _merge(_attend(q, k, v, attrs.get("scale"), bias, bool(attrs.get("unidirectional", 0))))
    return y if attrs["_num_outputs"] == 1 else (y,)


@op(f"{MS}.MultiHeadAttention")
def multi_head_attention(attrs, inputs):
    _no_cache("MultiHeadAttention", inputs, (6, 7))
    q, k, v, b = inputs[0], inputs[1], inputs[2], opt(inputs, 3)
    if q.ndim != 3 or k is None or k.ndim != 3:
        raise UnsupportedModel("MultiHeadAttention with packed or per-head key/value is not implemented in the "
                               "PyTorch executor")
    if b is not None:
        bq, bk, bv = torch.split(b, [q.shape[-1], k.shape[-1], v.shape[-1]])
        q, k, v = q + bq, k + bk, v + bv
    heads, fill = attrs["num_heads"], attrs.get("mask_filter_value", MASK_FILTER)
    bias = _key_mask(opt(inputs, 4), q.shape[0], q.shape[1], k.shape[1], fill)
    extra = opt(inputs, 5)
    if extra is not None:
        bias = extra if bias is None else bias + extra
    y = _attend(_heads(q, heads), _heads(k, heads), _heads(v, heads), attrs.get("scale"), bias,
                bool(attrs.get("unidirectional", 0)))
    return _merge(y) if attrs["_num_outputs"] == 1 else (_merge(y),)


@op("Attention")
def standard_attention(attrs, inputs):
    """The ONNX Attention (opset 23) without a cache: (batch, heads, sequence, size) inputs, or
    (batch, sequence, hidden) with q_num_heads / kv_num_heads; key/value heads repeated for GQA."""
    _no_cache("Attention", inputs, (4, 5))
    q, k, v, mask = inputs[0], inputs[1], inputs[2], opt(inputs, 3)
    flat = q.ndim == 3
    if flat:
        q, k, v = _heads(q, attrs["q_num_heads"]), _heads(k, attrs["kv_num_heads"]), _heads(v, attrs["kv_num_heads"])
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.where(mask, 0.0, float("-inf"))
    if attrs.get("softcap", 0.0):
        raise UnsupportedModel("Attention with softcap is not implemented in the PyTorch executor")
    y = _attend(q, k, v, attrs.get("scale"), mask, bool(attrs.get("is_causal", 0)))
    y = _merge(y) if flat else y
    return y if attrs["_num_outputs"] == 1 else (y,)


# --- MatMulNBits ---------------------------------------------------------------------------------

def _unpack(packed: Tensor, bits: int) -> Tensor:
    """uint8 bytes -> their ``bits``-wide values, low bits first (as onnxruntime packs them)."""
    if bits == 8:
        return packed
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits
    values = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return values.reshape(*packed.shape[:-1], -1)


def dequantize_nbits(attrs, packed: Tensor, scales: Tensor, zeros: Tensor | None) -> Tensor:
    """The (N, K) float weight of a MatMulNBits: (q - zero point) x scale, block by block."""
    n, k, bits, block = attrs["N"], attrs["K"], attrs.get("bits", 4), attrs["block_size"]
    blocks = packed.shape[1]
    q = _unpack(packed, bits).reshape(n, blocks, -1)[..., :block].float()
    scales = scales.reshape(n, blocks, 1)
    if zeros is None:
        zero = torch.full_like(scales, 2 ** (bits - 1))
    elif zeros.dtype == torch.uint8:
        zero = _unpack(zeros.reshape(n, -1), bits)[:, :blocks].float().reshape(n, blocks, 1)
    else:
        zero = zeros.reshape(n, blocks, 1)
    w = ((q - zero) * scales).reshape(n, -1)[:, :k]
    return w.to(scales.dtype)


def _prepare_nbits(attrs):
    if attrs.get("bits", 4) not in (2, 4, 8):
        raise UnsupportedModel(f"MatMulNBits with bits={attrs['bits']} is not implemented in the PyTorch executor "
                               "(2, 4 and 8 are)")
    return attrs


@op(f"{MS}.MatMulNBits", prepare=_prepare_nbits)
def matmul_nbits(attrs, inputs):
    if opt(inputs, 4) is not None:
        raise UnsupportedModel("MatMulNBits with g_idx is not implemented in the PyTorch executor")
    a, packed, scales, zeros, bias = inputs[0], inputs[1], inputs[2], opt(inputs, 3), opt(inputs, 5)
    y = a @ dequantize_nbits(attrs, packed, scales, zeros).to(a.dtype).T
    return y if bias is None else y + bias


# --- rotary embeddings and GroupQueryAttention -------------------------------------------------------

def _rotate(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """Rotate the first 2 x cos.shape[-1] channels of each head of ``x`` (..., sequence, head
    size) by the angles whose cos and sin are given (..., sequence, rotary / 2)."""
    rotary = 2 * cos.shape[-1]
    xr, rest = x[..., :rotary], x[..., rotary:]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2)
    else:
        x1, x2 = xr.chunk(2, -1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    return torch.cat([out, rest], -1)


def _positions(position_ids: Tensor, batch: int, length: int) -> Tensor:
    """(batch, sequence) positions: given so, or as one offset added to 0, 1, 2, ..."""
    if position_ids.numel() == 1:
        start = position_ids.reshape(()).long()
        return (start + torch.arange(length, device=position_ids.device)).expand(batch, length)
    return position_ids.long()


@op(f"{MS}.RotaryEmbedding")
def rotary_embedding(attrs, inputs):
    x, position_ids, cos_cache, sin_cache = inputs
    flat = x.ndim == 3
    if flat:
        heads = attrs.get("num_heads", 0) or x.shape[-1] // (2 * cos_cache.shape[-1])
        x = _heads(x, heads)
    b, _, s, _ = x.shape
    rotary = attrs.get("rotary_embedding_dim", 0) or 2 * cos_cache.shape[-1]
    pos = _positions(position_ids, b, s)
    cos, sin = cos_cache[pos][..., : rotary // 2].unsqueeze(1), sin_cache[pos][..., : rotary // 2].unsqueeze(1)
    y = _rotate(x, cos.to(x.dtype), sin.to(x.dtype), bool(attrs.get("interleaved", 0)))
    return _merge(y) if flat else y


def _prepare_gqa(attrs):
    if attrs.get("local_window_size", -1) not in (-1, 0) or attrs.get("qk_output", 0):
        raise UnsupportedModel("GroupQueryAttention with a local window or its scores output is not implemented "
                               "in the PyTorch executor")
    return attrs


@op(f"{MS}.GroupQueryAttention", prepare=_prepare_gqa)
def group_query_attention(attrs, inputs):
    """Without padding inside the new tokens: token i of row b sits at position
    seqlens_k[b] + 1 - sequence + i, after the past (of that length) in the cache."""
    if any(opt(inputs, i) is not None for i in (12, 13, 14, 15, 16)):
        raise UnsupportedModel("GroupQueryAttention with a quantised cache, q/k norms or packed batching is not "
                               "implemented in the PyTorch executor")
    heads, kv_heads = attrs["num_heads"], attrs["kv_num_heads"]
    q, k, v = inputs[0], opt(inputs, 1), opt(inputs, 2)
    if k is None:
        head = q.shape[-1] // (heads + 2 * kv_heads)
        q, k, v = torch.split(q, [heads * head, kv_heads * head, kv_heads * head], -1)
    q, k, v = _heads(q, heads), _heads(k, kv_heads), _heads(v, kv_heads)
    b, _, s, d = q.shape
    lengths = inputs[5].long().reshape(-1) + 1  # seqlens_k: the total valid length - 1, per row
    past_len = lengths - s
    if attrs.get("do_rotary", 0):
        pos = opt(inputs, 9)
        pos = pos.long() if pos is not None else past_len[:, None] + torch.arange(s, device=q.device)
        cos, sin = inputs[7][pos].unsqueeze(1).to(q.dtype), inputs[8][pos].unsqueeze(1).to(q.dtype)
        interleaved = bool(attrs.get("rotary_interleaved", 0))
        q, k = _rotate(q, cos, sin, interleaved), _rotate(k, cos, sin, interleaved)
    past_k, past_v = opt(inputs, 3), opt(inputs, 4)
    if past_k is not None and past_k.shape[2]:
        k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
    t = k.shape[2]
    share = heads // kv_heads
    scores = q @ k.repeat_interleave(share, 1).transpose(-1, -2) * (attrs.get("scale") or 1 / math.sqrt(d))
    if attrs.get("softcap", 0.0):
        scores = attrs["softcap"] * torch.tanh(scores / attrs["softcap"])
    keys = torch.arange(t, device=q.device)
    query_at = past_len[:, None] + torch.arange(s, device=q.device)  # (batch, sequence)
    allowed = (keys[None, None, :] <= query_at[:, :, None]) & (keys[None, None, :] < lengths[:, None, None])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    bias = opt(inputs, 10)
    if bias is not None:
        scores = scores + bias
    sink = opt(inputs, 11)
    if sink is None and attrs.get("smooth_softmax", 0):
        sink = torch.zeros(heads, dtype=scores.dtype, device=scores.device)
    if sink is not None:  # one more logit per head in the softmax's denominator
        extra = sink.to(scores.dtype).reshape(1, heads, 1, 1).expand(b, heads, s, 1)
        weights = torch.softmax(torch.cat([scores, extra], -1), -1)[..., :-1]
    else:
        weights = torch.softmax(scores, -1)
    y = _merge(weights @ v.repeat_interleave(share, 1))
    return (y, k, v)[: attrs["_num_outputs"]]
