"""Training data: tokenizers, token shards, datasets and rank-sliced step batches.

- :mod:`.tokenizer`: the built-in byte tokenizer and local tokenizer.json files.
- :mod:`.prepare`: ``tierlift data prepare`` (text -> Parquet token shards).
- :mod:`.shards`: the shard directory format and its checks.
- :mod:`.datasets`: :class:`TokenShardDataset`, :class:`SyntheticDataset`, :func:`build_dataset`.
- :mod:`.order`: the deterministic sample order shared by all ranks.
- :mod:`.loader`: :class:`StepBatcher`, one optimizer step of micro-batches per call.
"""

from tierlift.runtime.data.config import DataConfig
from tierlift.runtime.data.datasets import SyntheticDataset, TokenShardDataset, build_dataset, synthetic_eval_seed
from tierlift.runtime.data.loader import StepBatcher, collate, tokens_per_step
from tierlift.runtime.data.order import epoch_order, global_step_indices, rank_slice, steps_per_epoch
from tierlift.runtime.data.prepare import DEFAULT_SHARD_TOKENS, prepare_cli, prepare_main, prepare_shards
from tierlift.runtime.data.shards import read_meta
from tierlift.runtime.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, get_tokenizer

__all__ = [
    "DataConfig",
    "Tokenizer", "ByteTokenizer", "HFTokenizer", "get_tokenizer",
    "prepare_shards", "prepare_cli", "prepare_main", "DEFAULT_SHARD_TOKENS",
    "read_meta",
    "TokenShardDataset", "SyntheticDataset", "build_dataset", "synthetic_eval_seed",
    "StepBatcher", "collate", "tokens_per_step",
    "global_step_indices", "rank_slice", "epoch_order", "steps_per_epoch",
]
