"""The data room: tokenizers, shard preparation, datasets and rank-sliced step batching.

CPU only, no process groups: ranks are simulated by building one StepBatcher per rank.
"""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from torch.utils.data import IterableDataset

from tierlift.errors import ConfigError, DataError
from tierlift.runtime.data import (ByteTokenizer, DataConfig, StepBatcher, SyntheticDataset, TokenShardDataset,
                                   build_dataset, collate, epoch_order, get_tokenizer, global_step_indices,
                                   prepare_cli, prepare_shards, rank_slice, read_meta, steps_per_epoch,
                                   tokens_per_step)
from tierlift.runtime.data.order import ShuffledOrder
from tierlift.runtime.data.shards import sha256_file

DOCS = ["The quick brown fox.", "Grüße aus Köln — ünïcödé ✓", "日本語のテキスト", "emoji 🚀 and more",
        "plain ascii document number five", "six", "seventh doc\nwith two lines"]


def _write_corpus(root, docs=DOCS):
    """Docs 0-2 as .txt files in a directory tree, the rest as one .jsonl; input order = DOCS order."""
    corpus = root / "corpus"
    (corpus / "a").mkdir(parents=True)
    for i, d in enumerate(docs[:3]):
        (corpus / "a" / f"{i}.txt").write_text(d, encoding="utf-8")
    with open(corpus / "b.jsonl", "w", encoding="utf-8") as f:
        for d in docs[3:]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    (corpus / "ignored.bin").write_bytes(b"\x00\x01")  # not a text suffix: skipped in directories
    return corpus


def _stream(docs):
    tok = ByteTokenizer()
    return [t for d in docs for t in tok.encode_document(d)]


# -- tokenizer -----------------------------------------------------------------

def test_byte_tokenizer_round_trip_and_markers():
    tok = get_tokenizer("byte")
    assert tok.vocab_size == 258 and (tok.bos_id, tok.eos_id) == (256, 257)
    for text in DOCS + ["", "\x00 tab\t"]:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text
        doc = tok.encode_document(text)
        assert doc[0] == 256 and doc[-1] == 257 and tok.decode(doc) == text
    # Cut inside a multi-byte character: decodes with U+FFFD instead of raising.
    ids = tok.encode("ab✓")
    assert tok.decode(ids[:-1]) == "ab\ufffd"
    with pytest.raises(DataError, match="byte tokenizer"):
        tok.decode([300])


def test_get_tokenizer_unknown_names_setting(tmp_path):
    with pytest.raises(DataError) as exc:
        get_tokenizer(str(tmp_path / "nope.json"))
    assert exc.value.setting == "--tokenizer" and "downloaded" in exc.value.fix


def test_hf_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    hf = tokenizers.Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = Whitespace()
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    hf.save(str(path))
    tok = get_tokenizer(str(path.parent))  # a directory holding tokenizer.json works too
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (5, 1, 2)
    assert tok.encode_document("hello world") == [1, 3, 4, 2]
    (tmp_path / "in.txt").write_text("hello world hello")
    meta = prepare_shards([str(tmp_path / "in.txt")], str(tmp_path / "out"), tokenizer=str(path),
                          show_progress=False)
    assert meta["vocab_size"] == 5 and meta["tokenizer_sha256"] == sha256_file(str(path))
    ds = TokenShardDataset(str(tmp_path / "out"), 4)
    assert ds.stream_tokens(0, ds.total_tokens).tolist() == [1, 3, 4, 3, 2]


# -- prepare + TokenShardDataset -----------------------------------------------

def test_prepare_reads_back_exact_tokens_across_shards(tmp_path):
    corpus = _write_corpus(tmp_path)
    out = tmp_path / "out"
    meta = prepare_shards([str(corpus)], str(out), shard_tokens=37, show_progress=False)
    expected = _stream(DOCS)
    assert meta["tokens"] == {"train": len(expected), "eval": 0}
    assert meta["documents"]["train"] == len(DOCS)
    entries = meta["shards"]["train"]
    assert [e["file"] for e in entries] == [f"train-{i:05d}.parquet" for i in range(len(entries))]
    assert [e["tokens"] for e in entries[:-1]] == [37] * (len(entries) - 1) and len(entries) > 3
    for e in entries:
        assert e["sha256"] == sha256_file(str(out / e["file"]))
    assert read_meta(str(out))["vocab_size"] == 258
    assert not [n for n in os.listdir(out) if ".tmp-" in n]

    seq_len = 10
    ds = TokenShardDataset(str(out), seq_len)
    assert ds.stream_tokens(0, ds.total_tokens).tolist() == expected
    assert len(ds) == (len(expected) - 1) // seq_len
    for i in range(len(ds)):  # windows cross shard boundaries (37 is not a multiple of 10)
        item = ds[i]
        window = expected[i * seq_len:i * seq_len + seq_len + 1]
        assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (seq_len,)
        assert item["input_ids"].tolist() == window[:-1]
        assert item["labels"].tolist() == window[1:]
    with pytest.raises(IndexError):
        ds[len(ds)]
    clone = pickle.loads(pickle.dumps(ds))  # what a DataLoader worker / Ray actor receives
    assert clone._cache == {} and torch.equal(clone[3]["labels"], ds[3]["labels"])


def test_prepare_eval_split_holds_out_whole_documents(tmp_path):
    corpus = _write_corpus(tmp_path)
    meta = prepare_shards([str(corpus)], str(tmp_path / "out"), eval_fraction=0.3, show_progress=False)
    # floor((i+1)*0.3) > floor(i*0.3) for i = 3 and 6 of 7 documents.
    eval_docs = [DOCS[3], DOCS[6]]
    train_docs = [d for i, d in enumerate(DOCS) if i not in (3, 6)]
    assert meta["documents"] == {"train": 5, "eval": 2}
    tr = TokenShardDataset(str(tmp_path / "out"), 4, "train")
    ev = TokenShardDataset(str(tmp_path / "out"), 4, "eval")
    assert tr.stream_tokens(0, tr.total_tokens).tolist() == _stream(train_docs)
    assert ev.stream_tokens(0, ev.total_tokens).tolist() == _stream(eval_docs)


def test_prepare_eval_fraction_too_small_for_corpus_leaves_out_dir_clean(tmp_path):
    (tmp_path / "one.txt").write_text("a single document")
    out = tmp_path / "out"
    with pytest.raises(DataError) as exc:
        prepare_shards([str(tmp_path / "one.txt")], str(out), eval_fraction=0.5, show_progress=False)
    assert exc.value.setting == "--eval-fraction"
    assert os.listdir(out) == []  # so the retry is not refused as "not empty"


def test_prepare_refuses_non_empty_out_dir_and_overwrite_replaces(tmp_path):
    corpus = _write_corpus(tmp_path)
    out = tmp_path / "out"
    first = prepare_shards([str(corpus)], str(out), shard_tokens=20, show_progress=False)
    assert len(first["shards"]["train"]) > 2
    with pytest.raises(DataError) as exc:
        prepare_shards([str(corpus)], str(out), show_progress=False)
    assert exc.value.setting == "--out" and "--overwrite" in exc.value.fix
    second = prepare_shards([str(corpus / "a")], str(out), overwrite=True, show_progress=False)
    assert len(second["shards"]["train"]) == 1
    assert sorted(n for n in os.listdir(out) if n.endswith(".parquet")) == ["train-00000.parquet"]
    ds = TokenShardDataset(str(out), 8)
    assert ds.stream_tokens(0, ds.total_tokens).tolist() == _stream(DOCS[:3])


def test_prepare_cli_returns_zero_and_bad_inputs_raise(tmp_path, capsys):
    corpus = _write_corpus(tmp_path)
    assert prepare_cli([str(corpus)], str(tmp_path / "out"), "byte", 1000, 0.0, False) == 0
    assert "train: 7 documents" in capsys.readouterr().out
    with pytest.raises(DataError) as exc:
        prepare_shards([str(tmp_path / "missing")], str(tmp_path / "o2"), show_progress=False)
    assert exc.value.setting == "TEXT"
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match="line 2"):
        prepare_shards([str(tmp_path / "bad.jsonl")], str(tmp_path / "o3"), show_progress=False)


def _prepared(tmp_path, shard_tokens=30):
    out = tmp_path / "out"
    prepare_shards([str(_write_corpus(tmp_path))], str(out), shard_tokens=shard_tokens, show_progress=False)
    return out


def test_corrupt_shard_is_named_with_fix(tmp_path):
    out = _prepared(tmp_path)
    shard = out / "train-00001.parquet"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(raw))
    ds = TokenShardDataset(str(out), 8)
    ds[0]  # shard 0 is intact
    with pytest.raises(DataError) as exc:
        for i in range(len(ds)):
            ds[i]
    assert exc.value.value == str(shard) and "re-run `tierlift data prepare" in exc.value.fix


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_truncated_shard_fails_at_open(tmp_path, damage):
    out = _prepared(tmp_path)
    shard = out / "train-00002.parquet"
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError) as exc:
        TokenShardDataset(str(out), 8)
    assert exc.value.value == str(shard) and "re-run `tierlift data prepare" in exc.value.fix


def test_missing_or_corrupt_meta(tmp_path):
    out = _prepared(tmp_path)
    (out / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="meta.json") as exc:
        TokenShardDataset(str(out), 8)
    assert "re-run" in exc.value.fix
    (out / "meta.json").unlink()
    with pytest.raises(DataError, match="no meta.json"):
        TokenShardDataset(str(out), 8)


# -- SyntheticDataset + build_dataset ------------------------------------------

def test_synthetic_dataset_deterministic_and_learnable():
    a, b = SyntheticDataset(64, 12, 258, seed=3), SyntheticDataset(64, 12, 258, seed=3)
    c = SyntheticDataset(64, 12, 258, seed=4)
    assert len(a) == 64
    for i in range(64):
        x, y = a[i], b[i]
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
        assert x["input_ids"].shape == (12,) and x["input_ids"].dtype == torch.long
        assert torch.equal(x["labels"][:-1], x["input_ids"][1:])  # labels are the next tokens
        step = (x["labels"] - x["input_ids"]) % a.alphabet  # one constant stride per sample
        assert len(set(step.tolist())) == 1 and 1 <= int(step[0]) <= SyntheticDataset.MAX_STRIDE
    assert any(not torch.equal(a[i]["input_ids"], c[i]["input_ids"]) for i in range(64))
    small = SyntheticDataset(8, 30, 5, seed=0)
    assert all(int(small[i]["input_ids"].max()) < 5 for i in range(8))


def test_build_dataset_synthetic_train_and_eval():
    cfg = DataConfig(source="synthetic", seq_len=8, synthetic_samples=32, synthetic_eval_samples=16, seed=1)
    tr, ev = build_dataset(cfg, 258, "train"), build_dataset(cfg, 258, "eval")
    assert len(tr) == 32 and len(ev) == 16
    assert not all(torch.equal(tr[i]["input_ids"], ev[i]["input_ids"]) for i in range(16))
    assert build_dataset(DataConfig(synthetic_eval_samples=0), 258, "eval") is None


def test_build_dataset_parquet_eval_and_vocab_check(tmp_path):
    out = _prepared(tmp_path)
    cfg = DataConfig(source="parquet", path=str(out), seq_len=8)
    assert len(build_dataset(cfg, 258, "train")) > 0
    assert build_dataset(cfg, 258, "eval") is None  # prepared without eval split
    with pytest.raises(DataError) as exc:
        build_dataset(cfg, 100, "train")
    assert exc.value.setting == "model.vocab_size" and "at least 258" in exc.value.fix
    ev_dir = tmp_path / "ev"
    prepare_shards([str(tmp_path / "corpus" / "a")], str(ev_dir), show_progress=False)
    cfg_ev = DataConfig(source="parquet", path=str(out), eval_path=str(ev_dir), seq_len=8)
    ev = build_dataset(cfg_ev, 258, "eval")
    assert ev.stream_tokens(0, ev.total_tokens).tolist() == _stream(DOCS[:3])
    with pytest.raises(DataError) as exc:
        build_dataset(DataConfig(source="parquet", path=str(out), seq_len=4096), 258, "train")
    assert exc.value.setting == "data.seq_len"
    with pytest.raises(DataError):
        DataConfig(source="parquet", path=str(tmp_path / "nope"))
    with pytest.raises(ConfigError):
        DataConfig(synthetic_eval_samples=-1)


# -- order + StepBatcher -------------------------------------------------------

def test_shuffled_order_is_a_permutation_and_epochs_differ():
    for n in (1, 2, 3, 7, 64, 100, 1000):
        assert sorted(ShuffledOrder(n, 9)[:]) == list(range(n))
    e0, e1 = list(epoch_order(200, 5, 0)), list(epoch_order(200, 5, 1))
    assert e0 != e1 and sorted(e0) == sorted(e1) == list(range(200))
    assert e0 != list(range(200)) and list(epoch_order(200, 5, 0, shuffle=False)) == list(range(200))
    assert list(epoch_order(200, 5, 0)) == e0  # pure


def test_rank_slice_layout():
    gb = list(range(12))  # world 2, accum 3, mbs 2
    assert rank_slice(gb, 0, 2, 2, 3) == [[0, 1], [2, 3], [4, 5]]
    assert rank_slice(gb, 1, 2, 2, 3) == [[6, 7], [8, 9], [10, 11]]
    with pytest.raises(ValueError):
        rank_slice(gb[:-1], 0, 2, 2, 3)


def _indexed(n):
    return [{"idx": i} for i in range(n)]  # a plain list is a map-style dataset


def _run(dataset, steps, mbs, accum, world, seed=0, shuffle=True, state=None):
    """Global batches (rank-major idx lists) of ``steps`` steps, one StepBatcher per simulated rank."""
    batchers = [StepBatcher(dataset, mbs, accum, r, world, seed, shuffle) for r in range(world)]
    if state is not None:
        for b in batchers:
            b.load_state_dict(json.loads(json.dumps(state)))
    out = []
    for _ in range(steps):
        step = []
        for b in batchers:
            micro = b.next_step()
            assert len(micro) == accum and all(m["idx"].shape == (mbs,) for m in micro)
            step += [i for m in micro for i in m["idx"].tolist()]
        out.append(step)
    states = [b.state_dict() for b in batchers]
    assert all(s == states[0] for s in states)  # every rank agrees on the position
    return out, states[0]


def test_step_batcher_union_over_ranks_is_the_global_batch():
    data = _indexed(103)
    mbs, accum, world = 2, 3, 4
    steps, _ = _run(data, 10, mbs, accum, world, seed=7)
    ref = StepBatcher(data, mbs, accum, 0, world, 7)
    spe = steps_per_epoch(103, 24)
    assert spe == 4
    for s, got in enumerate(steps):
        assert got == ref.global_step_indices(s)
        assert got == global_step_indices(s, dataset_len=103, global_batch_size=24, seed=7)
        assert len(set(got)) == 24  # disjoint across ranks and micro-batches
    epoch0 = [i for st in steps[:spe] for i in st]
    assert len(set(epoch0)) == spe * 24  # no sample twice within an epoch; the tail of 7 is dropped
    assert sorted(steps[spe]) != sorted(steps[0])  # epoch 1 reshuffles
    assert _run(data, 10, mbs, accum, world, seed=7)[0] == steps  # deterministic across runs
    assert _run(data, 10, mbs, accum, world, seed=8)[0] != steps


def test_step_batcher_without_shuffle_visits_in_index_order():
    steps, _ = _run(_indexed(20), 4, 2, 2, 2, shuffle=False)
    assert steps == [list(range(8)), list(range(8, 16)), list(range(8)), list(range(8, 16))]


def test_step_batcher_resume_mid_epoch_matches_uninterrupted():
    data = _indexed(50)  # GB 8 -> 6 steps per epoch; 14 steps cross two epoch boundaries
    full, _ = _run(data, 14, 2, 2, 2, seed=3)
    head, state = _run(data, 4, 2, 2, 2, seed=3)
    assert state["samples_consumed"] == 32 and state["epoch"] == 0 and state["samples_in_epoch"] == 32
    tail, end_state = _run(data, 10, 2, 2, 2, seed=3, state=state)
    assert head + tail == full
    assert end_state["epoch"] == 2 and end_state["samples_consumed"] == 14 * 8


@pytest.mark.parametrize("mbs,accum,world", [(1, 2, 4), (4, 2, 1), (8, 1, 1), (1, 1, 8)])
def test_step_batcher_resume_at_other_world_size_same_global_batch(mbs, accum, world):
    data = _indexed(61)
    full, _ = _run(data, 12, 2, 2, 2, seed=11)
    _, state = _run(data, 5, 2, 2, 2, seed=11)
    tail, _ = _run(data, 7, mbs, accum, world, seed=11, state=state)
    assert tail == full[5:]


def test_step_batcher_refuses_state_of_other_global_batch_or_data():
    data = _indexed(64)
    _, state = _run(data, 3, 2, 2, 2)
    other = StepBatcher(data, 2, 3, 0, 2, 0)
    with pytest.raises(DataError) as exc:
        other.load_state_dict(state)
    assert exc.value.setting == "train.global_batch_size" and "= 8" in exc.value.fix
    with pytest.raises(DataError) as exc:
        StepBatcher(_indexed(65), 2, 2, 0, 2, 0).load_state_dict(state)
    assert exc.value.setting == "data"
    with pytest.raises(DataError) as exc:
        StepBatcher(data, 2, 2, 0, 2, 1).load_state_dict(state)
    assert exc.value.setting == "data.seed"


def test_step_batcher_too_small_dataset():
    with pytest.raises(DataError) as exc:
        StepBatcher(_indexed(7), 2, 2, 0, 2, 0)
    assert "7 samples" in exc.value.message and "global batch of 8" in exc.value.message
    with pytest.raises(DataError):
        StepBatcher([], 1, 1, 0, 1, 0)


class _Stream(IterableDataset):
    def __init__(self, n):
        self.n, self.epochs = n, []

    def set_epoch(self, e):
        self.epochs.append(e)

    def __iter__(self):
        return ({"x": i} for i in range(self.n))


def _run_stream(n, steps, mbs, accum, world, state=None):
    stream = _Stream(n)
    batchers = [StepBatcher(stream, mbs, accum, r, world, 0) for r in range(world)]
    if state is not None:
        for b in batchers:
            b.load_state_dict(state)
    out = [[i for b in batchers for m in b.next_step() for i in m["x"].tolist()] for _ in range(steps)]
    return out, batchers[0].state_dict(), stream


def test_iterable_dataset_slicing_rollover_and_resume():
    gb = 6  # 20 items -> 3 full batches per pass, tail of 2 dropped
    full, state, stream = _run_stream(20, 7, 1, 3, 2)
    assert full[:3] == [list(range(0, 6)), list(range(6, 12)), list(range(12, 18))]
    assert full[3:6] == full[:3] and full[6] == full[0]
    assert stream.epochs == [0, 0, 1, 1, 2, 2]  # set_epoch(pass) before each pass, by each of the 2 ranks
    b = StepBatcher(_Stream(20), 1, 3, 1, 2, 0)
    assert b.next_step()[1]["x"].tolist() == [4] and b.global_step_indices(1) == list(range(6, 12))
    assert state["epoch"] == 2 and state["samples_in_epoch"] == gb and state["samples_consumed"] == 7 * gb
    _, mid, _ = _run_stream(20, 4, 1, 3, 2)
    tail, _, _ = _run_stream(20, 3, 3, 1, 2, state=mid)  # resumed with another mbs/accum, same GB
    assert tail == full[4:]
    with pytest.raises(DataError, match="fewer than one global batch"):
        StepBatcher(_Stream(5), 1, 3, 0, 2, 0).next_step()


def test_collate_real_items_and_tokens_per_step():
    ds = SyntheticDataset(16, 10, 258, seed=0)
    micro = StepBatcher(ds, 4, 2, 0, 2, 0).next_step()
    assert len(micro) == 2 and micro[0]["input_ids"].shape == (4, 10) and micro[0]["labels"].dtype == torch.long
    assert collate([{"a": [1, 2], "b": 3}, {"a": [4, 5], "b": 6}])["a"].tolist() == [[1, 2], [4, 5]]
    assert tokens_per_step(32, 128) == 4096
