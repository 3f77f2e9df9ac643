"""Tokenizers for packing: a built-in byte-level one and Hugging Face ``tokenizers``.

The byte-level tokenizer needs no file or download, which is what tests and the demo use.
A Hugging Face tokenizer comes from a local ``tokenizer.json`` or, for users online, a hub
name. ``train_bpe`` trains a small byte-level BPE on a local corpus so a real subword
vocabulary is available offline.

Tokenizers are described by a picklable :class:`TokenizerSpec` and loaded inside each
worker process, since Rust tokenizer objects should not cross process boundaries.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = [
    "BYTE",
    "ByteTokenizer",
    "Tokenizer",
    "TokenizerSpec",
    "load_tokenizer",
    "token_dtype",
    "train_bpe",
]

BYTE = "byte"
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    id_bound: int  # one more than the largest token id (vocabularies may have gaps)

    def encode(self, text: str) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, EOS = 256; vocabulary 257."""

    vocab_size = 257
    eos_id = 256
    id_bound = 257

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def describe(self) -> dict[str, Any]:
        return {"name": BYTE, "vocab_size": self.vocab_size, "eos_id": self.eos_id}


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` with a resolved EOS id."""

    def __init__(self, name: str, eos_token: str | None = None) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self.name = name
        if os.path.exists(name):
            path = Path(name)
            if path.is_dir():
                path = path / "tokenizer.json"
            try:
                self._tok = RustTokenizer.from_file(str(path))
            except Exception as exc:
                raise ValueError(f"cannot load tokenizer file {path}: {exc}") from None
        else:
            try:
                self._tok = RustTokenizer.from_pretrained(name)
            except Exception:
                raise ValueError(
                    f"tokenizer {name!r} is neither a local tokenizer.json nor loadable by "
                    "name (offline?); pass a path to tokenizer.json or --tokenizer byte"
                ) from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.id_bound = max(vocab.values(), default=-1) + 1
        self.eos_id = self._resolve_eos(eos_token)

    def _resolve_eos(self, eos_token: str | None) -> int:
        candidates = (eos_token,) if eos_token else EOS_CANDIDATES
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return int(token_id)
        if eos_token:
            raise ValueError(f"EOS token {eos_token!r} is not in the vocabulary of {self.name}")
        raise ValueError(
            f"tokenizer {self.name} has none of the usual EOS tokens "
            f"({', '.join(EOS_CANDIDATES)}); name one with --eos-token"
        )

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id}


@dataclass(frozen=True)
class TokenizerSpec:
    """Picklable description of a tokenizer: ``"byte"``, a tokenizer.json path, or a name."""

    name: str = BYTE
    eos_token: str | None = None

    def load(self) -> Tokenizer:
        return load_tokenizer(self.name, self.eos_token)


def load_tokenizer(name: str = BYTE, eos_token: str | None = None) -> Tokenizer:
    if name == BYTE:
        if eos_token is not None:
            raise ValueError("the byte tokenizer has a fixed EOS id (256); drop --eos-token")
        return ByteTokenizer()
    return HFTokenizer(name, eos_token)


def token_dtype(vocab_size: int, requested: str | None = None) -> str:
    """The narrowest unsigned dtype that holds every token id, or the requested one if it fits.

    ``vocab_size`` must bound the ids (largest id + 1), not count them: vocabularies can
    have gaps.
    """
    limits = {"uint16": 1 << 16, "uint32": 1 << 32}
    if requested is not None:
        if requested not in limits:
            raise ValueError(f"token dtype must be uint16 or uint32, not {requested!r}")
        if vocab_size > limits[requested]:
            raise ValueError(
                f"vocabulary of {vocab_size} tokens does not fit in {requested} "
                f"(max {limits[requested]}); use --dtype uint32 or omit --dtype"
            )
        return requested
    return "uint16" if vocab_size <= limits["uint16"] else "uint32"


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str | os.PathLike[str]) -> Path:
    """Train a byte-level BPE tokenizer on ``texts`` and save it as a ``tokenizer.json``.

    Byte-level pre-tokenization means every input is encodable (no unknown tokens), and
    ``<|endoftext|>`` is reserved as EOS so the result plugs straight into ``convert``.
    """
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (bytes + EOS), got {vocab_size}")
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return out
