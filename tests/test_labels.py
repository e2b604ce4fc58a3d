"""One label rule for built and passed-in Hugging Face models (tierlift/models/labels.py)."""

from __future__ import annotations

import pytest
import torch

from _dist import run_ranks
from tierlift.errors import ConfigError
from tierlift.models.labels import check_labels

pytest.importorskip("transformers")

SEQ = 12
LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 32}


def _data(shifted: bool) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 64, (SEQ + 1,), generator=g) for _ in range(8)]
    if shifted:
        return [{"input_ids": x[:-1], "labels": x[1:]} for x in rows]
    return [{"input_ids": x[:-1], "labels": x[:-1].clone()} for x in rows]


def _cfg():
    from tierlift.runtime.config import TrainConfig
    return TrainConfig.from_dict({"model": {"kind": "hf", "hf_config": LLAMA}, "data": {"seq_len": SEQ, "shuffle": False},
                                  "train": {"micro_batch_size": 2, "max_steps": 1}, "run": {"device": "cpu"}})


def _user_model_first_loss():
    """A user's own HF model (HF's shifting loss) in the Trainer, vs the same weights built from config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tierlift.models import build_model
    from tierlift.runtime.trainer import Trainer

    cfg, data = _cfg(), _data(shifted=True)
    built = build_model(cfg.model, seed=1)
    user = AutoModelForCausalLM.from_config(AutoConfig.for_model(**LLAMA))
    user.load_state_dict(built.state_dict())
    batch = {k: torch.stack([d[k] for d in data[:2]]) for k in data[0]}
    with torch.no_grad():
        want = float(built(**batch).loss)
    return Trainer(user, cfg, train_data=data).fit(max_steps=1).losses[0], want


def test_a_users_hf_model_reads_labels_as_a_built_one_does():
    got, want = run_ranks(_user_model_first_loss, 1)
    assert got == pytest.approx(want, rel=1e-5)


def _refused():
    from transformers import AutoConfig, AutoModelForCausalLM

    from tierlift.runtime.trainer import Trainer

    try:
        Trainer(AutoModelForCausalLM.from_config(AutoConfig.for_model(**LLAMA)), _cfg(), train_data=_data(False))
    except ConfigError as e:
        return e.setting, str(e)
    return None, ""


def test_the_trainer_refuses_unshifted_labels_in_one_line():
    setting, message = run_ranks(_refused, 1)
    assert setting == "labels" and "labels[:, i]" in message and "\n" not in message


@pytest.mark.parametrize("labels, refused", [
    ([5, 9, 2, 7], True),                 # labels == input_ids: HF's convention
    ([-100, 9, 2, 7], True),              # the same with a masked prompt
    ([9, 2, 7, 4], False),                # shifted: tierlift's rule
    ([-100, -100, -100, 7], False),       # one labelled position says nothing
])
def test_check_labels(labels, refused):
    sample = {"input_ids": torch.tensor([5, 9, 2, 7]), "labels": torch.tensor(labels)}
    if refused:
        with pytest.raises(ConfigError):
            check_labels(sample)
    else:
        check_labels(sample)


def test_a_repeated_token_reads_both_ways_and_passes():
    check_labels({"input_ids": torch.full((6,), 3), "labels": torch.full((6,), 3)})
