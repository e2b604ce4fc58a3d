"""Built-in reference models (dense and MoE GPT) and Hugging Face builders.

Importing this package never imports ``transformers``: :func:`build_hf_model`
imports it when called (kind "hf"), so the optional dependency stays optional.
"""

from tierlift.models.config import ModelConfig
from tierlift.models.gpt import GPT, GPTBlock
from tierlift.models.hf import build_hf_model, use_aligned_labels
from tierlift.models.layers import CausalLMOutput, aligned_lm_loss
from tierlift.models.moe import Expert, MoEBlock, MoEGPT
from tierlift.models.registry import build_model, count_params, wrap_class_names

__all__ = [
    "ModelConfig", "GPT", "GPTBlock", "MoEGPT", "MoEBlock", "Expert", "CausalLMOutput", "aligned_lm_loss",
    "build_model", "build_hf_model", "use_aligned_labels", "count_params", "wrap_class_names",
]
