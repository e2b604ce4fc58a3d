"""Activation policies through the Trainer on 2 CPU ranks (gloo), stage 3: keep, swap,
recompute, selective and a mixed ``auto`` plan under a small GPU budget give the same
losses and final parameters as ``keep`` (1e-6 relative), on the tiny GPT and on a tiny
Hugging Face Llama with attention dropout on."""

from __future__ import annotations

import pytest
import torch

from _dist import run_ranks
from _fakes import arith_samples

GPT = {"kind": "gpt", "vocab_size": 64, "d_model": 32, "n_layers": 3, "n_heads": 4, "max_seq_len": 16}
LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.1, pad_token_id=0)
POLICIES = ("keep", "swap", "recompute", "selective", "auto")
STEPS = 3


def _fit(kind: str, policy: str, budget: int):
    from tierlift import Trainer, TrainConfig
    from tierlift.models import build_model
    from tierlift.models.config import ModelConfig

    act = {"policy": policy, "min_swap_bytes": 0, "gpu_budget_bytes": budget}
    d = {"model": GPT, "data": {"seq_len": 16, "shuffle": False},
         "train": {"micro_batch_size": 2, "max_steps": STEPS, "grad_accum_steps": 2, "activations": act},
         "optimizer": {"lr": 3e-3}, "zero": {"stage": 3}, "run": {"device": "cpu"}}
    if kind == "gpt":
        model = build_model(ModelConfig(**GPT), seed=5)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**LLAMA))
        d["model"] = {"kind": "hf", "hf_config": {"model_type": "llama", **LLAMA}}
    trainer = Trainer(model, TrainConfig.from_dict(d), train_data=arith_samples(64, seed=2))
    summary = trainer.fit(STEPS)
    acts = trainer.engine.activations
    plan = [(x.decision, x.swap_fraction) for x in acts.plan.decisions] if acts is not None else []
    return summary.losses, trainer.full_state_dict(), plan


def _all(kind: str):
    return {p: _fit(kind, p, 6000 if p == "auto" else 0) for p in POLICIES}


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_policies_match_keep(kind):
    out = run_ranks(_all, 2, kind)
    ref_losses, ref_state, _ = out["keep"]
    for policy in POLICIES[1:]:
        losses, state, plan = out[policy]
        assert losses == pytest.approx(ref_losses, rel=1e-6), policy
        for k, v in ref_state.items():
            torch.testing.assert_close(state[k], v, rtol=1e-6, atol=1e-7, msg=f"{policy}: {k}")
    auto_plan = out["auto"][2]
    assert len(auto_plan) == 3 and {d for d, _ in auto_plan} != {"keep"}, auto_plan  # the budget bites
