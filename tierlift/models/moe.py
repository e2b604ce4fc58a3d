"""Mixture-of-experts reference GPT: top-k routed SwiGLU experts in every block.

Each expert is its own module (:class:`Expert`), hence its own wrap unit and
chunk, nested inside its block's unit.  The stage-3 engine gathers and reduces a
block's chunks together, its experts' included, whether or not a token is routed
to them: collectives must run in the same order on every rank, and each rank routes
differently (docs/zero.md, "A unit's nested units").  The dispatch below calls only
the experts that receive a token, so compute follows the routing; moving only
routed experts is left to the host/NVMe tiers, where no collective is involved.
The price of the dispatch is one host sync per MoE layer (the per-expert token
counts decide which experts run), the same one Mixtral's eager dispatch pays.

Parameter names: ``layers.N.mlp.router.weight`` (E, d) and
``layers.N.mlp.experts.E.{gate,up,down}_proj.weight``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tierlift.models.config import ModelConfig
from tierlift.models.gpt import GPT, resolved_d_ff
from tierlift.models.layers import CausalSelfAttention, RMSNorm, SwiGLU

__all__ = ["MoEGPT", "MoEBlock", "SparseMoE", "Expert"]


class Expert(SwiGLU):
    """One expert: a SwiGLU MLP.  Its own class so that wrapping by class name
    makes every expert a separate chunk."""


class SparseMoE(nn.Module):
    """Top-k softmax router over ``n_experts`` experts.

    Routing weights are the softmax probabilities of the chosen experts,
    renormalised over the top-k when k > 1 (Mixtral); with k = 1 the raw
    probability is kept (Switch), since a renormalised weight of 1 would give
    the router no gradient from the LM loss.

    Load-balancing loss (Switch / Mixtral): E · Σ_e f_e · p_e, with f_e the
    fraction of the N·k token-to-expert assignments that went to e (not
    differentiable) and p_e the mean router probability of e.  It is 1 for a
    perfectly balanced router and E for one that sends everything to one expert.
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int, top_k: int) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.top_k = top_k
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(Expert(d_model, d_ff) for _ in range(n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d_model = x.shape[-1]
        tokens = x.reshape(-1, d_model)
        n_tokens = tokens.shape[0]
        # Router math in fp32: bf16 softmax ties would make top-k arbitrary.
        probs = F.softmax(self.router(tokens).float(), dim=-1)
        top_probs, top_experts = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.top_k > 1:
            top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)

        # Assignment a = token * k + slot.  Sorting assignments by expert makes
        # every expert's tokens one contiguous run.
        assigned_expert = top_experts.reshape(-1)
        counts = torch.bincount(assigned_expert, minlength=self.n_experts)
        order = torch.argsort(assigned_expert, stable=True)
        token_of = order // self.top_k
        weight_of = top_probs.reshape(-1).index_select(0, order)

        fraction = counts.float() / assigned_expert.numel()
        aux_loss = self.n_experts * (fraction * probs.mean(dim=0)).sum()

        out = torch.zeros_like(tokens)
        start = 0
        for expert_index, count in enumerate(counts.tolist()):  # the one host sync
            if count == 0:
                continue  # never call it: the engine then never gathers its chunk
            rows = token_of[start:start + count]
            y = self.experts[expert_index](tokens.index_select(0, rows))
            y = y * weight_of[start:start + count, None].to(y.dtype)
            # index_add_ (not scatter via advanced indexing): deterministic on CPU,
            # and a token routed to k experts sums their k contributions.
            out.index_add_(0, rows, y.to(out.dtype))
            start += count
        assert start == n_tokens * self.top_k
        return out.reshape(x.shape), aux_loss


class MoEBlock(nn.Module):
    """x + attn(norm(x)), then x + moe(norm(x)).  Returns (x, aux_loss)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SparseMoE(cfg.d_model, resolved_d_ff(cfg), cfg.n_experts, cfg.top_k)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.attn_norm(x), cos, sin, attn_mask)
        moe_out, aux_loss = self.mlp(self.mlp_norm(x))
        return x + moe_out, aux_loss


class MoEGPT(GPT):
    """GPT whose every block is a :class:`MoEBlock`.

    ``.aux_loss`` of the output is the load-balancing loss averaged over layers;
    ``.loss`` = LM cross-entropy + ``aux_loss_coef`` · aux_loss.  Experts that no
    token chose get no gradient (``grad`` stays None) in that step.
    """

    _no_split_modules = ["MoEBlock", "Expert"]

    def _make_block(self, cfg: ModelConfig, index: int) -> nn.Module:
        return MoEBlock(cfg)

    def _run_blocks(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        aux_losses = []
        for block in self.layers:
            h, aux_loss = block(h, cos, sin, attn_mask)
            aux_losses.append(aux_loss)
        return h, torch.stack(aux_losses).mean()
