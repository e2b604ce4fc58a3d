"""Tokenizers: a byte-level one that ships with the package, or a local HF file.

The byte tokenizer needs no files and no network: ids 0-255 are the UTF-8 bytes
of the text, 256 is BOS and 257 is EOS (vocab_size 258, the default
``model.vocab_size``).  A Hugging Face ``tokenizer.json`` on local disk is read
with the ``tokenizers`` package when it is installed; nothing is ever downloaded
(a run must not depend on a hub being reachable from every node).

A document is encoded as ``BOS + tokens + EOS`` (:meth:`Tokenizer.encode_document`)
so a model trained on the concatenated stream sees where documents begin and end.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from tierlift.errors import DataError
from tierlift.runtime.data.shards import sha256_file

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "get_tokenizer", "BYTE_TOKENIZER_NAME"]

BYTE_TOKENIZER_NAME = "byte"

# Special-token spellings of common tokenizer.json files, most specific first.
# GPT-2 style files only have "<|endoftext|>": it then serves as EOS and no BOS
# is added (two separators in a row would carry no extra information).
_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "[BOS]", "<|startoftext|>")
_EOS_CANDIDATES = ("<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|endoftext|>")


class Tokenizer:
    """What the data code needs from a tokenizer.

    ``name``: how :func:`get_tokenizer` finds it again ("byte" or the absolute
    path of a tokenizer.json); ``vocab_size``: number of ids (every id is
    ``< vocab_size``); ``bos_id`` / ``eos_id``: document markers, None when the
    tokenizer has none.
    """

    name: str
    kind: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without document markers."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; document markers are dropped."""
        raise NotImplementedError

    def encode_document(self, text: str) -> list[int]:
        """``BOS + encode(text) + EOS``, leaving out markers the tokenizer lacks."""
        ids = self.encode(text)
        if self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def describe(self) -> dict[str, Any]:
        """JSON-able identity stored in a shard directory's meta.json."""
        return {"tokenizer": self.name, "tokenizer_kind": self.kind, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0-255, BOS = 256, EOS = 257; vocab_size = 258.

    Lossless for any text; decoding is safe on any id sequence, including one cut
    in the middle of a multi-byte character (the broken tail becomes U+FFFD
    instead of raising), so samples and generated text can always be printed.
    """

    name = BYTE_TOKENIZER_NAME
    kind = "byte"
    BOS = 256
    EOS = 257
    vocab_size = 258
    bos_id: int | None = BOS
    eos_id: int | None = EOS

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif i not in (self.BOS, self.EOS):
                raise DataError(f"is not an id of the byte tokenizer (ids are 0..{self.vocab_size - 1}).",
                                setting="token id", value=i,
                                fix="decode ids produced by the byte tokenizer, or use the tokenizer "
                                    "the data was prepared with.")
        return out.decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A local Hugging Face ``tokenizer.json`` read with the ``tokenizers`` package.

    BOS / EOS are found among the file's tokens by their usual spellings; when
    only an end-of-text token exists it is the EOS and no BOS is added.
    """

    kind = "hf"

    def __init__(self, path: str, *, setting: str = "--tokenizer") -> None:
        try:
            from tokenizers import Tokenizer as _HFTok
        except ImportError as exc:
            raise DataError("needs the `tokenizers` package to read a tokenizer.json file.",
                            setting=setting, value=path,
                            fix="`pip install tokenizers`, or use the built-in byte tokenizer "
                                "(--tokenizer byte).") from exc
        path = os.path.abspath(path)
        try:
            self._tok = _HFTok.from_file(path)
        except Exception as exc:  # the Rust side raises a bare Exception on a malformed file
            raise DataError(f"could not be read as a Hugging Face tokenizer.json ({exc}).",
                            setting=setting, value=path,
                            fix="give the tokenizer.json file saved by `tokenizer.save(...)` / "
                                "`save_pretrained(...)`.") from exc
        self.name = path
        self.sha256 = sha256_file(path)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.bos_id = self._find(_BOS_CANDIDATES)
        self.eos_id = self._find(_EOS_CANDIDATES)
        if self.bos_id is not None and self.bos_id == self.eos_id:
            self.bos_id = None

    def _find(self, candidates: tuple[str, ...]) -> int | None:
        for tok in candidates:
            i = self._tok.token_to_id(tok)
            if i is not None:
                return int(i)
        return None

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["tokenizer_sha256"] = self.sha256
        return d


def get_tokenizer(name_or_path: str = BYTE_TOKENIZER_NAME, *, setting: str = "--tokenizer") -> Tokenizer:
    """"byte" (the default), a tokenizer.json file, or a directory holding one.

    ``setting`` names the flag or config key the value came from, for errors.
    """
    if name_or_path in ("", BYTE_TOKENIZER_NAME):
        return ByteTokenizer()
    path = name_or_path
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise DataError("is neither the built-in tokenizer nor a local tokenizer.json file.",
                        setting=setting, value=name_or_path,
                        fix=f"use {BYTE_TOKENIZER_NAME!r}, or the path of a tokenizer.json file "
                            "(or of a directory holding one); tokenizers are never downloaded.")
    return HFTokenizer(path, setting=setting)
