"""Dense reference GPT: pre-norm blocks (RMSNorm, causal RoPE attention, SwiGLU).

The model the engine is developed and tested against without ``transformers``.
Parameter names follow Llama's (``embed_tokens``, ``layers.N.attn.q_proj`` ...,
``norm``, ``lm_head``), and with ``tie_embeddings`` the LM head *is* the
embedding's Parameter under a second name, exactly as in tied HF models, so the
engine's and checkpoints' alias handling is exercised by the built-in model too.
"""

from __future__ import annotations

import torch
from torch import nn

from tierlift.errors import ConfigError
from tierlift.models.config import ModelConfig
from tierlift.models.layers import (
    CausalLMOutput, CausalSelfAttention, RMSNorm, SwiGLU, aligned_lm_loss, default_d_ff, init_weights,
    padding_causal_mask, rope_tables,
)

__all__ = ["GPT", "GPTBlock", "resolved_d_ff"]


def resolved_d_ff(cfg: ModelConfig) -> int:
    """``cfg.d_ff``, or the SwiGLU default when it is 0."""
    return cfg.d_ff or default_d_ff(cfg.d_model)


class GPTBlock(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)); one wrap unit (one chunk)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, resolved_d_ff(cfg))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, attn_mask)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """Decoder-only LM.  ``forward(input_ids, labels=None, attention_mask=None)``.

    ``labels`` follow tierlift's data convention: ``labels[:, i]`` is the target
    of position ``i`` (already shifted; -100 = ignored), so the loss is
    mean CE(logits[:, i], labels[:, i]) in fp32.  ``attention_mask`` (1 = token,
    0 = padding) is optional; leave it None for full rows, which keeps the fused
    causal attention kernels.

    Subclasses change the blocks through :meth:`_make_block` and
    :meth:`_run_blocks` (see :class:`tierlift.models.moe.MoEGPT`).
    """

    _no_split_modules = ["GPTBlock"]

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.kind == "hf":
            raise ConfigError("is a Hugging Face model, not a built-in one.", setting="model.kind",
                              value=cfg.kind, fix="build it with tierlift.models.build_model(cfg).")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(self._make_block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            # One Parameter under two names (as HF ties): updates reach both uses.
            self.lm_head.weight = self.embed_tokens.weight
        init_weights(self, cfg.init_std, cfg.n_layers)

    def _make_block(self, cfg: ModelConfig, index: int) -> nn.Module:
        return GPTBlock(cfg)

    def _run_blocks(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states through every block; returns (hidden, aux_loss or None)."""
        for block in self.layers:
            h = block(h, cos, sin, attn_mask)
        return h, None

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> CausalLMOutput:
        seq = input_ids.shape[-1]
        if seq > self.cfg.max_seq_len:
            raise ConfigError(f"the batch has sequences of {seq} tokens, longer than the model's maximum.",
                              setting="model.max_seq_len", value=self.cfg.max_seq_len,
                              fix=f"raise model.max_seq_len to at least {seq} or lower data.seq_len.")
        h = self.embed_tokens(input_ids)
        cos, sin = rope_tables(seq, self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_theta, h.device)
        attn_mask = None if attention_mask is None else padding_causal_mask(attention_mask)
        h, aux_loss = self._run_blocks(h, cos, sin, attn_mask)
        logits = self.lm_head(self.norm(h))
        loss = None
        if labels is not None:
            loss = aligned_lm_loss(logits, labels)
            if aux_loss is not None and self.cfg.aux_loss_coef:
                loss = loss + self.cfg.aux_loss_coef * aux_loss
        return CausalLMOutput(loss=loss, logits=logits, aux_loss=aux_loss)
