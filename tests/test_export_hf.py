"""`tierlift export` of a trained Hugging Face model is a directory that
AutoModelForCausalLM.from_pretrained loads as is and that generates the same greedy
tokens as the trained model (issue 17: tiny Llama, Qwen2-MoE, GPT-2 with tied embeddings)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from _dist import run_ranks

pytest.importorskip("transformers")

SEQ, STEPS = 16, 3
_COMMON = {"vocab_size": 64, "bos_token_id": 1, "eos_token_id": 2}
MODELS = {
    "llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
              "tie_word_embeddings": False, **_COMMON},
    "qwen2_moe": {"model_type": "qwen2_moe", "hidden_size": 32, "intermediate_size": 64,
                  "moe_intermediate_size": 16, "shared_expert_intermediate_size": 32, "num_experts": 4,
                  "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "max_position_embeddings": 64, **_COMMON},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64,
             "tie_word_embeddings": True, **_COMMON},
}
PROMPT = torch.tensor([[5, 9, 13, 17, 21]])


def _cfg_dict(hf_config: dict) -> dict:
    return {"model": {"kind": "hf", "hf_config": hf_config}, "data": {"seq_len": SEQ},
            "train": {"micro_batch_size": 2, "max_steps": STEPS, "checkpoint_every": STEPS, "log_every": 1},
            "optimizer": {"lr": 1e-2}, "scheduler": {"kind": "constant"}, "run": {"device": "cpu"}}


def _greedy(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.generate(PROMPT, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)


def _train(cfg_dict: dict, run_dir: str):
    """One rank: train STEPS steps (stage 3) as `tierlift train` would, checkpoint, and
    return the trained weights' greedy tokens (a fresh model loaded with the full state)."""
    from tierlift.models import build_model
    from tierlift.runtime.config import TrainConfig
    from tierlift.runtime.trainer import Trainer

    cfg = TrainConfig.from_dict(cfg_dict)
    model = build_model(cfg.model, seed=cfg.train.seed)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": x[:-1], "labels": x[1:]}
            for x in ((torch.randint(0, 64, (1,), generator=g) + 3 * torch.arange(SEQ + 1)) % 64 for _ in range(32))]
    trainer = Trainer(model, cfg, train_data=data, run_dir=run_dir)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:  # what `tierlift train` writes
        f.write(cfg.to_yaml())
    summary = trainer.fit(max_steps=STEPS)
    full = trainer.full_state_dict()
    ref = build_model(cfg.model, seed=cfg.train.seed)
    ref.load_state_dict(full)
    return summary.losses, _greedy(ref), {k: v.clone() for k, v in full.items()}


@pytest.mark.parametrize("name", list(MODELS))
def test_export_loads_with_from_pretrained_and_generates_the_same_tokens(name, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from tierlift.launch.cli import main
    from tierlift.runtime.export import export_safetensors

    run, out = tmp_path / "run", tmp_path / "out"
    run.mkdir()
    losses, want, full = run_ranks(_train, 1, _cfg_dict(MODELS[name]), str(run))
    assert len(losses) == STEPS
    if name == "qwen2_moe":  # sharded: shards plus the index from_pretrained reads
        files = export_safetensors(run, out, max_shard_bytes=40_000, show_progress=False)
        assert any(f.endswith("model.safetensors.index.json") for f in files)
        assert len([f for f in files if f.endswith(".safetensors")]) > 1
    else:
        assert main(["export", str(run), "--out", str(out)]) == 0
        assert f"exported step {STEPS} " in capsys.readouterr().out
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()
    assert json.loads((out / "config.json").read_text())["use_cache"] is True

    loaded, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, full[k]), k
    if name == "gpt2":  # the tie is written once and re-tied on load
        index_or_file = (out / "model.safetensors")
        from safetensors import safe_open
        with safe_open(str(index_or_file), framework="pt") as f:
            assert "lm_head.weight" not in f.keys() and "transformer.wte.weight" in f.keys()
        assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert torch.equal(_greedy(loaded), want)

    if name == "llama":  # a checkpoint outside its run dir: weights only, unless the caller names the config
        import shutil

        from transformers import AutoConfig

        ckpt = tmp_path / "lone-ckpt"
        shutil.copytree(next((run / "checkpoints").iterdir()), ckpt)
        export_safetensors(ckpt, tmp_path / "bare", show_progress=False)
        assert not (tmp_path / "bare" / "config.json").exists()
        export_safetensors(ckpt, tmp_path / "api", show_progress=False,
                           hf_config=AutoConfig.for_model(**MODELS[name]))
        again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "api"))
        assert torch.equal(_greedy(again), want)
        # the same from the command line: --hf-config names a dir with the model's config.json
        cfg_dir = tmp_path / "hfcfg"
        AutoConfig.for_model(**MODELS[name]).save_pretrained(str(cfg_dir))
        assert main(["export", str(ckpt), "--out", str(tmp_path / "cli"), "--hf-config", str(cfg_dir)]) == 0
        cli = AutoModelForCausalLM.from_pretrained(str(tmp_path / "cli"))
        assert torch.equal(_greedy(cli), want)
        capsys.readouterr()
        assert main(["export", str(ckpt), "--out", str(tmp_path / "bad"), "--hf-config", str(tmp_path / "nope")]) == 2
        err = capsys.readouterr().err
        assert "--hf-config" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "bad").exists()
