"""Building blocks shared by the built-in reference models (and the HF loss).

Everything here reads its weights from registered ``nn.Parameter`` objects at
forward time: the ZeRO engine swaps ``param.data`` for views into flat, sharded
buffers between forwards, so nothing derived from a parameter (a transpose, its
shape, its data pointer) may be cached at construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tierlift.models.chunked_ce import chunked_cross_entropy

__all__ = [
    "CausalLMOutput", "RMSNorm", "SwiGLU", "CausalSelfAttention", "rope_tables", "apply_rope",
    "aligned_lm_loss", "default_d_ff", "init_weights", "padding_causal_mask", "IGNORE_INDEX",
]

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    """What a model's forward returns; indexable like ``transformers.ModelOutput``
    (``out.loss``, ``out["loss"]``, ``out[0]`` = the first field that is set), so
    code written for HF models works on the built-in ones unchanged."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]


def default_d_ff(d_model: int) -> int:
    """The SwiGLU hidden size that keeps the MLP at ~8·d² parameters (as a 4·d
    GELU MLP), rounded up to a multiple of 16 for tensor-core friendly shapes."""
    return 16 * math.ceil(8 * d_model / 3 / 16)


def aligned_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int | None = None,
                    num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = IGNORE_INDEX,
                    shift_labels: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
    """Mean next-token cross-entropy where ``labels[..., i]`` is already the target
    of position ``i`` (tierlift's data pipeline shifts; this function does not).

    Computed in fp32 whatever the logits' dtype (bf16 log-softmax over a large
    vocabulary loses the small probabilities), a chunk of rows at a time, so no fp32
    copy of the logits is ever held (``chunked_ce.py``: 4 bytes per logit at the peak
    instead of 10 with bf16 logits).  A batch whose labels are all
    ``ignore_index`` gives 0, not NaN (division by max(count, 1), with no host
    sync).  ``num_items_in_batch`` (HF's gradient-accumulation convention) turns
    the mean into sum / num_items_in_batch.  The signature matches
    ``transformers``' ``ForCausalLMLoss`` so it can replace a HF model's
    ``loss_function``; ``shift_labels``, when given, is used as the targets.
    """
    targets = shift_labels if shift_labels is not None else labels
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1).to(device=flat_logits.device, dtype=torch.long)
    # fp32 a chunk of rows at a time: no fp32 copy of the logits (models/chunked_ce.py)
    total = chunked_cross_entropy(flat_logits, flat_targets, ignore_index)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    count = (flat_targets != ignore_index).sum().clamp(min=1)
    return total / count


class RMSNorm(nn.Module):
    """RMSNorm normalising in fp32 (the mean of squares of bf16 activations is
    too coarse), returning the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases (Llama/Mixtral MLP)."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_tables(seq_len: int, head_dim: int, theta: float,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (seq_len, head_dim), for rotate-half RoPE.

    Computed per forward instead of kept in a buffer: it costs seq·head_dim/2
    multiplications, and a buffer would have to survive meta-device construction
    and the engine's parameter moves.  fp32 (bf16 positions collide beyond 256);
    :func:`apply_rope` casts them to the activations' dtype.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (batch, heads, seq, head_dim) by position-dependent angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    # Tables follow x's dtype (bf16 under autocast) so RoPE never promotes q/k to fp32.
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with RoPE on q and k, through
    ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU)."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq, d_model = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)

        q = apply_rope(heads(self.q_proj(x)), cos, sin)
        k = apply_rope(heads(self.k_proj(x)), cos, sin)
        v = heads(self.v_proj(x))
        if attn_mask is None:
            # The fast path: no materialised mask, so flash attention applies.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, d_model))


def padding_causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Boolean (batch, 1, seq, seq) mask from an HF-style (batch, seq) padding
    mask (1 = real token): causal and no attention to padding keys.

    Every query may always attend to itself, so a left-padding row is never
    empty (an all-masked row makes SDPA return NaN, which would poison the
    gradients even though its label is ignored).  Positions stay 0..seq-1: RoPE
    scores depend only on the query-key distance, so left padding needs no
    position shift.  Built without reading the mask on the host (no sync).
    """
    seq = attention_mask.shape[-1]
    device = attention_mask.device
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    allowed = causal & attention_mask.bool()[:, None, None, :]
    return allowed | torch.eye(seq, dtype=torch.bool, device=device)


def init_weights(model: nn.Module, std: float, n_layers: int) -> None:
    """GPT-2 style init: N(0, std) for every matrix and embedding, ones for norm
    weights, and std / sqrt(2·n_layers) for the projections that write into the
    residual stream (``o_proj``, ``down_proj``) so its variance does not grow
    with depth.  Draws in module registration order, so a fixed seed gives the
    same weights on every rank."""
    residual_std = std / math.sqrt(2 * n_layers)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            is_residual = name.endswith("o_proj") or name.endswith("down_proj")
            nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
