"""The model after a stage-3 fit(): a documented way back to a full model
(``unwrap_model``, ``gathered_parameters``), a clear error instead of a crash for a
sharded parameter touched outside them, and a forward only some ranks enter fails
fast instead of hanging in the all-gather.  Training continues afterwards."""

from __future__ import annotations

import os

import pytest
import torch

from _dist import run_ranks
from _fakes import arith_samples

GPT = {"kind": "gpt", "vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 16}
LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GEN = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)


def _cfg(**over):
    from tierlift import TrainConfig
    d = {"model": GPT, "data": {"seq_len": 16, "shuffle": False}, "train": {"micro_batch_size": 2, "max_steps": 2},
         "optimizer": {"lr": 3e-3}, "zero": {"stage": 3}, "run": {"device": "cpu"}}
    for k, v in over.items():
        d[k] = {**d.get(k, {}), **v}
    return TrainConfig.from_dict(d)


def _gpt_trainer(**over):
    from tierlift import Trainer
    from tierlift.models import build_model
    from tierlift.models.config import ModelConfig
    model = build_model(ModelConfig(**GPT), seed=5)
    return model, Trainer(model, _cfg(**over), train_data=arith_samples(64, seed=2),
                          eval_data=arith_samples(8, seed=4))


def _llama_trainer(**over):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tierlift import Trainer
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA))
    return model, Trainer(model, _cfg(**over), train_data=arith_samples(64, seed=2))


def _sharded_name(model) -> str:
    from tierlift.parallel.sharded_param import is_guarded
    return next(n for n, p in model.named_parameters() if is_guarded(p))


# -- one process ---------------------------------------------------------------------------------
def test_sharded_parameter_is_a_clear_error_and_training_continues():
    from tierlift.parallel.sharded_param import ShardedParameterError
    model, trainer = _gpt_trainer()
    first = trainer.fit(2).losses
    name = _sharded_name(model)
    p = model.get_parameter(name)
    assert p.shape and p.dtype == torch.float32 and p.grad is None  # metadata still answers
    for touch in (lambda: p.sum(), lambda: model.state_dict(), lambda: repr(p), lambda: p.detach().clone()):
        with pytest.raises(ShardedParameterError) as info:
            touch()
        msg = str(info.value)
        assert name in msg and "unwrap_model()" in msg and "gathered_parameters()" in msg and "\n" not in msg
    second = trainer.fit(4).losses  # the engine's own gathers still work through the guard

    _, ref = _gpt_trainer()
    assert first + second == ref.fit(4).losses


def test_unwrap_gives_the_models_dtype_and_a_later_fit_rebinds():
    # bf16 compute: the engine's buffers are bf16, the model was built fp32.
    model, trainer = _gpt_trainer(precision={"compute": "bf16"})
    trainer.fit(1)
    full = trainer.full_state_dict()
    unwrapped = trainer.unwrap_model()
    assert unwrapped is model
    sd = model.state_dict()
    assert all(sd[k].dtype == torch.float32 and torch.equal(sd[k], v) for k, v in full.items())
    assert not model._forward_pre_hooks and not any(m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():  # edits to the unwrapped copy are not taken back into training
        for prm in model.parameters():
            prm.add_(1.0)
    trainer.fit(2)
    assert _sharded_name(model)  # bound to the engine again: sharded and guarded
    _, ref = _gpt_trainer(precision={"compute": "bf16"})
    ref.fit(2)
    assert all(torch.equal(a, b) for a, b in zip(trainer.full_state_dict().values(), ref.full_state_dict().values()))


# -- two ranks -----------------------------------------------------------------------------------
def _after_fit(out_dir: str):
    from transformers import LlamaForCausalLM

    from tierlift.parallel.sharded_param import ShardedParameterError
    rank = int(os.environ["RANK"])
    model, trainer = _llama_trainer()
    trainer.fit(2)
    full = trainer.full_state_dict()
    res = {}
    try:
        model.save_pretrained(os.path.join(out_dir, f"early-{rank}"))
    except ShardedParameterError as e:
        res["save_error"] = str(e)
    prompt = torch.tensor([[1, 5, 9, 13]])
    with trainer.gathered_parameters():
        if rank == 0:  # one rank alone: no collective inside the context
            res["gathered_gen"] = model.generate(prompt, **GEN)
    unwrapped = trainer.unwrap_model()
    sd = unwrapped.state_dict()
    if rank == 0:
        res["keys_equal"] = set(full) == set(sd)
        res["values_equal"] = all(torch.equal(sd[k], v) for k, v in full.items())
        res["gen"] = unwrapped.generate(prompt, **GEN)
        path = os.path.join(out_dir, "hf")
        unwrapped.save_pretrained(path)
        loaded = LlamaForCausalLM.from_pretrained(path)
        res["loaded_equal"] = all(torch.equal(loaded.state_dict()[k], v) for k, v in full.items())
        res["loaded_gen"] = loaded.generate(prompt, **GEN)
    res["losses"] = trainer.fit(4).losses  # training goes on (exactness: the one-process tests)
    return res


@pytest.mark.slow
def test_two_ranks_unwrap_gives_full_model_save_pretrained_and_generate(tmp_path):
    pytest.importorskip("transformers")
    r = run_ranks(_after_fit, 2, str(tmp_path))
    assert "unwrap_model()" in r["save_error"]
    assert r["keys_equal"] and r["values_equal"] and r["loaded_equal"]
    assert r["gen"].shape == (1, 10) and torch.equal(r["gen"], r["gathered_gen"])
    assert torch.equal(r["loaded_gen"], r["gen"])
    assert len(r["losses"]) == 2 and all(0 < x < 10 for x in r["losses"])


def _partial():
    import tempfile

    import torch.distributed as dist

    from tierlift.parallel.rendezvous import RanksAbsentError
    from tierlift.parallel.sharded_param import ShardedParameterError
    rank = int(os.environ["RANK"])
    model, trainer = _gpt_trainer(zero={"rendezvous_timeout_s": 2.0})
    trainer.fit(1)
    batch = arith_samples(2, seed=9)[0]
    batch = {k: v[None] for k, v in batch.items()}
    res = {}
    tmp = tempfile.mkdtemp()
    if rank == 0:  # the usual mistakes: eval, gathered_parameters, full_state_dict on rank 0 alone
        calls = {"forward": lambda: model(**batch), "gathered": trainer.gathered_parameters().__enter__,
                 "state": trainer.full_state_dict, "evaluate": lambda: trainer.evaluate(1),
                 "save": lambda: trainer.save(os.path.join(tmp, "alone"))}
        for name, call in calls.items():
            try:
                call()
            except RanksAbsentError as e:
                res[name] = str(e)
    dist.barrier()  # the process group is still usable after the errors
    res["eval_loss"] = trainer.evaluate(1)  # every rank: passes the check
    model = trainer.unwrap_model(rank0_only=True)
    if rank == 0:
        res["loss"] = float(model(**batch).loss)  # alone, no collective: works
    else:  # rank 1 keeps the model sharded
        try:
            model.state_dict()
            raise AssertionError("rank 1's model should still be sharded after unwrap_model(rank0_only=True)")
        except ShardedParameterError:
            pass
    res["losses"] = trainer.fit(3).losses
    return res


@pytest.mark.slow
@pytest.mark.timeout(240)  # before the rendezvous check this hung in the all-gather
def test_forward_on_some_ranks_fails_fast_and_the_job_goes_on():
    r = run_ranks(_partial, 2)
    for key in ("forward", "gathered", "state", "evaluate", "save"):
        assert "only 1 of 2 ranks" in r[key] and "zero.rendezvous_timeout_s" in r[key], r[key]
        assert "unwrap_model(rank0_only=True)" in r[key] and "\n" not in r[key]
    assert "a forward of unit '" in r["forward"]
    assert r["loss"] > 0 and r["eval_loss"] > 0 and len(r["losses"]) == 2


def test_rendezvous_gives_up_cleanly_and_a_late_rank_never_passes_an_abandoned_check():
    import threading

    import torch.distributed as dist

    from tierlift.parallel.rendezvous import RanksAbsentError, Rendezvous
    store = dist.HashStore()
    r0, r1 = Rendezvous(0, 2, timeout_s=0.05), Rendezvous(1, 2, timeout_s=0.05)
    r1.prefix = r0.prefix  # two ranks of one engine, sharing the store in one process
    r0._store = r1._store = store
    with pytest.raises(RanksAbsentError, match=r"zero.rendezvous_timeout_s=0.05: .*only 1 of 2 ranks"):
        r0.check("forward", "a forward")
    with pytest.raises(RanksAbsentError):  # rank 0 gave up: rank 1, late, must not pass alone
        r1.check("forward", "a forward")
    r0.timeout_s = r1.timeout_s = 60.0
    for _ in range(3):  # both here: both pass, as often as they meet
        t = threading.Thread(target=r1.check, args=("forward", "a forward"))
        t.start()
        r0.check("forward", "a forward")
        t.join()
    assert r0._seq == r1._seq == {"forward": 3}
    r0.timeout_s = r1.timeout_s = 0.2
    errors = []

    def other():
        try:
            r1.check("forward", "a forward")
        except RanksAbsentError as e:
            errors.append(e)

    t = threading.Thread(target=other)
    t.start()
    with pytest.raises(RanksAbsentError):  # two ranks in different collectives: both fail, neither passes
        r0.check("unwrap_model", "unwrap_model()")
    t.join()
    assert len(errors) == 1 and r0._seq == r1._seq == {"forward": 3}

    # Two of three ranks giving up at once: each takes back exactly its own count.
    a, b = Rendezvous(0, 3, 1.0), Rendezvous(1, 3, 1.0)
    store.add("k", 2)
    assert a._leave(store, "k") == 1 and b._leave(store, "k") == 0 and store.add("k", 0) == 0
    store.add("k", 3)  # all three here meanwhile: nobody leaves
    assert a._leave(store, "k") is None and store.add("k", 0) == 3


@pytest.mark.parametrize("bad", [0, -1.0, "soon"])
def test_rendezvous_timeout_setting_is_validated(bad):
    from tierlift.errors import ConfigError
    from tierlift.parallel.config import ZeroConfig
    with pytest.raises(ConfigError, match="zero.rendezvous_timeout_s") as info:
        ZeroConfig(rendezvous_timeout_s=bad)
    assert "Fix:" in str(info.value)
