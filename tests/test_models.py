"""Built-in reference models and the Hugging Face builders (CPU, tiny sizes)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tierlift.errors import ConfigError
from tierlift.models import (
    GPT, Expert, ModelConfig, MoEGPT, build_model, count_params, wrap_class_names,
)
from tierlift.models.layers import apply_rope, rope_tables

VOCAB = 64
SEQ = 16


def tiny(kind: str = "gpt", **overrides) -> ModelConfig:
    base = dict(kind=kind, vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)
    if kind == "moe-gpt":
        base.update(n_experts=4, top_k=2)
    base.update(overrides)
    return ModelConfig(**base)


def batch(seed: int = 0, size: int = 2, seq: int = SEQ, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    """A batch under tierlift's convention: labels[:, i] is the token after input_ids[:, i]."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (size, seq + 1), generator=gen)
    labels = tokens[:, 1:].clone()
    labels[0, :3] = -100  # some ignored targets
    return {"input_ids": tokens[:, :-1], "labels": labels}


def manual_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def train(model: torch.nn.Module, data: dict[str, torch.Tensor], steps: int, lr: float = 3e-3) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------- dense and MoE GPT

@pytest.mark.parametrize("kind", ["gpt", "moe-gpt"])
def test_forward_shapes_and_loss_is_unshifted_ce(kind):
    model = build_model(tiny(kind, aux_loss_coef=0.0), seed=0)
    data = batch()
    out = model(**data)
    assert out.logits.shape == (2, SEQ, VOCAB)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, manual_ce(out.logits, data["labels"]))
    assert out["loss"] is out.loss and out[0] is out.loss
    assert model(data["input_ids"]).loss is None


def test_moe_loss_adds_weighted_aux_loss():
    model = build_model(tiny("moe-gpt", aux_loss_coef=0.5), seed=0)
    data = batch()
    out = model(**data)
    assert out.aux_loss > 0
    torch.testing.assert_close(out.loss, manual_ce(out.logits, data["labels"]) + 0.5 * out.aux_loss)


def test_loss_over_all_ignored_labels_is_zero_not_nan():
    model = build_model(tiny(), seed=0)
    data = batch()
    data["labels"].fill_(-100)
    assert model(**data).loss.item() == 0.0


@pytest.mark.parametrize("kind", ["gpt", "moe-gpt"])
def test_loss_decreases_on_repeated_batch(kind):
    torch.manual_seed(0)
    model = build_model(tiny(kind), seed=0)
    losses = train(model, batch(), steps=30)
    assert all(map(lambda v: v == v, losses))
    assert losses[-1] < 0.5 * losses[0], losses


def test_bf16_autocast_loss_is_fp32():
    model = build_model(tiny(), seed=0)
    data = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**data)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, manual_ce(out.logits, data["labels"]))


def test_tied_embeddings_share_storage_and_stay_tied():
    model = build_model(tiny(tie_embeddings=True), seed=0)
    assert model.lm_head.weight is model.embed_tokens.weight
    train(model, batch(), steps=2)
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["embed_tokens.weight"].data_ptr()
    untied = build_model(tiny(tie_embeddings=False), seed=0)
    assert untied.lm_head.weight.data_ptr() != untied.embed_tokens.weight.data_ptr()
    assert count_params(untied) - count_params(model) == VOCAB * 32


@pytest.mark.parametrize("kind", ["gpt", "moe-gpt"])
def test_future_tokens_do_not_change_past_logits(kind):
    model = build_model(tiny(kind), seed=0).eval()
    ids = batch()["input_ids"]
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_tables(32, 8, 10000.0, torch.device("cpu"))
    q, k = torch.randn(8), torch.randn(8)

    def score(m: int, n: int) -> torch.Tensor:
        rq = apply_rope(q.view(1, 1, 1, 8), cos[m], sin[m])
        rk = apply_rope(k.view(1, 1, 1, 8), cos[n], sin[n])
        return (rq * rk).sum()

    torch.testing.assert_close(score(5, 2), score(20, 17))
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_padding_mask_right_and_left():
    model = build_model(tiny(), seed=0).eval()
    ids = batch()["input_ids"][:1, :10]
    pad = torch.zeros(1, 6, dtype=torch.long)
    ones, zeros = torch.ones(1, 10, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long)
    with torch.no_grad():
        plain = model(ids).logits
        right = model(torch.cat([ids, pad], 1), attention_mask=torch.cat([ones, zeros], 1)).logits
        left = model(torch.cat([pad, ids], 1), attention_mask=torch.cat([zeros, ones], 1)).logits
    torch.testing.assert_close(right[:, :10], plain)
    # RoPE is relative, so left padding needs no position shift.
    torch.testing.assert_close(left[:, 6:], plain, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(left).all()


def test_sequence_longer_than_max_seq_len_is_a_config_error():
    model = build_model(tiny(max_seq_len=8), seed=0)
    with pytest.raises(ConfigError, match="model.max_seq_len"):
        model(batch()["input_ids"])


@pytest.mark.parametrize("kind", ["gpt", "moe-gpt"])
def test_forward_reads_parameters_after_data_is_swapped_for_flat_views(kind):
    """The ZeRO engine replaces param.data with views into a flat buffer."""
    model = build_model(tiny(kind), seed=0).eval()
    ids = batch()["input_ids"]
    with torch.no_grad():
        before = model(ids).logits
        params = list(model.parameters())
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        offset = 0
        for p in params:
            p.data = flat[offset:offset + p.numel()].view(p.shape)
            offset += p.numel()
        torch.testing.assert_close(model(ids).logits, before)
        flat.zero_()  # every weight is now zero, including the RMSNorm gains
        assert model(ids).logits.abs().max().item() == 0.0


def test_same_seed_same_weights_and_global_rng_untouched():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_model(tiny("moe-gpt"), seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    b = build_model(tiny("moe-gpt"), seed=7)
    c = build_model(tiny("moe-gpt"), seed=8)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.state_dict()["layers.0.attn.q_proj.weight"],
                           c.state_dict()["layers.0.attn.q_proj.weight"])


def test_residual_projections_use_scaled_init():
    model = build_model(tiny(d_model=256, n_heads=4, n_layers=8, init_std=0.02), seed=0)
    q_std = model.layers[0].attn.q_proj.weight.std().item()
    o_std = model.layers[0].attn.o_proj.weight.std().item()
    assert q_std == pytest.approx(0.02, rel=0.05)
    assert o_std == pytest.approx(0.02 / 4.0, rel=0.05)  # 1/sqrt(2 * 8)


# ---------------------------------------------------------------- MoE routing

def count_expert_calls(model: MoEGPT) -> dict[str, int]:
    calls: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, Expert):
            calls[name] = 0
            module.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


def test_unrouted_experts_are_never_called():
    model = build_model(tiny("moe-gpt", n_experts=4, top_k=2), seed=0)
    # Force every router onto experts 0 and 1.
    bias = torch.tensor([50.0, 50.0, -50.0, -50.0])
    for block in model.layers:
        block.mlp.router.register_forward_hook(lambda m, i, out: out + bias)
    calls = count_expert_calls(model)
    model(**batch()).loss.backward()
    for layer in range(2):
        prefix = f"layers.{layer}.mlp.experts"
        assert calls[f"{prefix}.0"] == 1 and calls[f"{prefix}.1"] == 1
        assert calls[f"{prefix}.2"] == 0 and calls[f"{prefix}.3"] == 0
        experts = model.layers[layer].mlp.experts
        assert experts[0].up_proj.weight.grad is not None
        assert experts[2].up_proj.weight.grad is None


def test_experts_called_exactly_when_routed():
    model = build_model(tiny("moe-gpt", n_experts=8, top_k=1), seed=3)
    routed: list[set[int]] = []
    for block in model.layers:
        block.mlp.router.register_forward_hook(
            lambda m, i, out: routed.append(set(out.argmax(-1).tolist())))
    calls = count_expert_calls(model)
    model(**batch(size=1, seq=4))
    for layer, chosen in enumerate(routed):
        called = {e for e in range(8) if calls[f"layers.{layer}.mlp.experts.{e}"]}
        assert called == chosen


def test_moe_dispatch_equals_dense_mixture():
    model = build_model(tiny("moe-gpt", n_experts=4, top_k=2), seed=0)
    moe = model.layers[0].mlp
    x = torch.randn(2, 5, 32)
    out, _ = moe(x)
    tokens = x.reshape(-1, 32)
    probs = F.softmax(moe.router(tokens), dim=-1)
    top_p, top_e = probs.topk(2, dim=-1)
    top_p = top_p / top_p.sum(-1, keepdim=True)
    every = torch.stack([expert(tokens) for expert in moe.experts], dim=1)  # (N, E, d)
    expected = (every.gather(1, top_e[..., None].expand(-1, -1, 32)) * top_p[..., None]).sum(1)
    torch.testing.assert_close(out.reshape(-1, 32), expected)


def test_aux_loss_is_one_when_balanced_and_n_experts_when_collapsed():
    model = build_model(tiny("moe-gpt", n_experts=4, top_k=1), seed=0)
    moe = model.layers[0].mlp
    x = torch.randn(4, 8, 32)
    with torch.no_grad():
        moe.router.weight.zero_()  # p_e = 1/E for all e, so E * sum f_e / E = 1 however ties break
        _, uniform = moe(x)
        assert uniform.item() == pytest.approx(1.0)
        hook = moe.router.register_forward_hook(lambda m, i, out: out + torch.tensor([30.0, 0, 0, 0]))
        _, collapsed = moe(x)
        hook.remove()
        assert collapsed.item() == pytest.approx(4.0, rel=1e-3)  # f = p = one-hot(0)
    out = model(**batch())
    assert 1.0 <= out.aux_loss.item() < 4.0


# ---------------------------------------------------------------- wrap units

def test_wrap_class_names_defaults_and_override():
    assert GPT._no_split_modules == ["GPTBlock"]
    assert wrap_class_names(build_model(tiny(), seed=0)) == ["GPTBlock"]
    moe = build_model(tiny("moe-gpt"), seed=0)
    assert wrap_class_names(moe) == ["MoEBlock", "Expert"]
    assert wrap_class_names(moe, ["Expert"]) == ["Expert"]
    with pytest.raises(ConfigError, match="zero.wrap") as info:
        wrap_class_names(moe, ["MoEBlok"])
    assert "MoEBlock" in str(info.value)
    assert wrap_class_names(torch.nn.Linear(2, 2)) == []


def test_importing_models_does_not_import_transformers():
    code = "import sys, tierlift.models; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})


def test_missing_transformers_is_a_config_error_with_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ConfigError, match=r"tierlift\[hf\]"):
        build_model(ModelConfig(kind="hf", hf_config={"model_type": "llama"}))


def test_missing_hf_path_is_a_config_error(tmp_path):
    importlib.import_module("transformers")
    missing = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match="model.hf_path") as info:
        build_model(ModelConfig(kind="hf", hf_path=missing))
    assert missing in str(info.value) and "Fix:" in str(info.value)


# ---------------------------------------------------------------- Hugging Face

def hf_spec(model_type: str, **extra) -> dict:
    spec = dict(model_type=model_type, vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if model_type == "mixtral":
        spec.update(num_local_experts=4, num_experts_per_tok=2)
    spec.update(extra)
    return spec


@pytest.mark.parametrize("model_type", ["llama", "mixtral"])
def test_hf_model_trains_under_our_label_convention(model_type):
    importlib.import_module("transformers")
    model = build_model(ModelConfig(kind="hf", hf_config=hf_spec(model_type)), seed=0)
    assert model.training and not model.config.use_cache
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert set(model.state_dict()) == set(type(model)(model.config).state_dict())  # HF's own names
    assert wrap_class_names(model) == [f"{model_type.capitalize()}DecoderLayer"]
    data = batch()
    out = model(**data)
    torch.testing.assert_close(out.loss, manual_ce(out.logits, data["labels"]))
    # HF's own loss would shift once more: make sure the two conventions differ here.
    shifted = manual_ce(out.logits[:, :-1], data["labels"][:, 1:])
    assert not torch.allclose(out.loss, shifted)
    losses = train(model, data, steps=8)
    assert losses[-1] < losses[0], losses


def test_hf_mixtral_router_aux_loss_is_added_when_configured():
    importlib.import_module("transformers")
    spec = hf_spec("mixtral", output_router_logits=True, router_aux_loss_coef=0.5)
    model = build_model(ModelConfig(kind="hf", hf_config=spec), seed=0)
    data = batch()
    out = model(**data)
    assert out.aux_loss > 0
    torch.testing.assert_close(out.loss, manual_ce(out.logits, data["labels"]) + 0.5 * out.aux_loss)


def test_hf_same_seed_same_weights():
    importlib.import_module("transformers")
    cfg = ModelConfig(kind="hf", hf_config=hf_spec("llama"))
    a, b = build_model(cfg, seed=5).state_dict(), build_model(cfg, seed=5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hf_path_loads_saved_weights_and_config_only_dirs(tmp_path):
    importlib.import_module("transformers")
    source = build_model(ModelConfig(kind="hf", hf_config=hf_spec("mixtral")), seed=0)
    source.to(torch.bfloat16).save_pretrained(tmp_path / "full")
    loaded = build_model(ModelConfig(kind="hf", hf_path=str(tmp_path / "full")))
    assert type(loaded) is type(source) and loaded.training
    src_state, new_state = source.state_dict(), loaded.state_dict()
    assert set(src_state) == set(new_state)
    for name, tensor in src_state.items():
        assert new_state[name].dtype == torch.float32, name  # bf16 checkpoint upcast
        assert torch.equal(new_state[name], tensor.float()), name
    data = batch()
    out = loaded(**data)
    torch.testing.assert_close(out.loss, manual_ce(out.logits, data["labels"]))

    source.config.save_pretrained(tmp_path / "config_only")
    fresh = build_model(ModelConfig(kind="hf", hf_path=str(tmp_path / "config_only")), seed=1)
    assert set(fresh.state_dict()) == set(src_state)
    assert all(p.dtype == torch.float32 for p in fresh.parameters())


def test_hf_config_errors_name_the_setting():
    importlib.import_module("transformers")
    with pytest.raises(ConfigError, match="model.hf_config"):
        build_model(ModelConfig(kind="hf", hf_config={"hidden_size": 32}))
    with pytest.raises(ConfigError, match="model.hf_config.model_type"):
        build_model(ModelConfig(kind="hf", hf_config={"model_type": "no_such_model"}))
    with pytest.raises(ConfigError, match="hidden_size") as info:
        build_model(ModelConfig(kind="hf", hf_config=hf_spec("llama", hiden_size=16)))
    assert "model.hf_config.hiden_size" in str(info.value)
