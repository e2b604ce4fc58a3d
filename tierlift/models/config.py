"""Config of the built-in reference models and of Hugging Face models."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tierlift._configbase import check, check_choice

__all__ = ["ModelConfig"]


@dataclass
class ModelConfig:
    """kind: "gpt" (dense), "moe-gpt" (top-k routed experts) or "hf" (a
    ``transformers`` causal LM from ``hf_config`` (a dict with ``model_type``) or
    ``hf_path`` (a local directory holding config.json and, optionally, weights)).

    The gpt fields are ignored for kind "hf" and vice versa; setting a field that
    the chosen kind does not use is an error (so a typo cannot pass silently).
    """

    kind: str = "gpt"
    vocab_size: int = 256 + 2
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 0  # 0 = the SwiGLU default, 8/3 * d_model rounded up to 16
    max_seq_len: int = 128
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # MoE
    n_experts: int = 0
    top_k: int = 2
    aux_loss_coef: float = 0.01
    # Hugging Face
    hf_config: dict[str, Any] = field(default_factory=dict)
    hf_path: str = ""

    def __post_init__(self) -> None:
        check_choice("model.kind", self.kind, ["gpt", "moe-gpt", "hf"])
        if self.kind == "hf":
            check(bool(self.hf_config) != bool(self.hf_path), "model.hf_config", self.hf_config,
                  "a Hugging Face model needs exactly one of hf_config or hf_path.",
                  "give hf_config: {model_type: llama, ...} or hf_path: /dir/with/config.json.")
            return
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 1, f"model.{name}", v, "must be a positive integer.",
                  "give a positive integer.")
        check(self.d_model % self.n_heads == 0 and (self.d_model // self.n_heads) % 2 == 0,
              "model.n_heads", self.n_heads, f"must divide d_model={self.d_model} into even head sizes (RoPE).",
              "pick n_heads so d_model / n_heads is even.")
        check(self.d_ff >= 0, "model.d_ff", self.d_ff, "must be >= 0.", "use 0 for the default.")
        if self.kind == "moe-gpt":
            check(self.n_experts >= 2, "model.n_experts", self.n_experts, "an MoE model needs >= 2 experts.",
                  "set n_experts to e.g. 4.")
            check(1 <= self.top_k <= self.n_experts, "model.top_k", self.top_k,
                  f"must be in [1, n_experts={self.n_experts}].", "use 2.")
        else:
            check(self.n_experts == 0, "model.n_experts", self.n_experts,
                  "is only used by kind 'moe-gpt'.", "set model.kind: moe-gpt or remove n_experts.")
