"""The demo corpus as per-group MDS streams: local text -> local BPE -> ``convert``.

Shared by ``make demo``, the benchmarks and anything else that needs a real multi-group
corpus without downloading one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from shard_tools import ConvertOptions, ConvertReport, InputSpec, convert
from shard_tools.demo_corpus import DEFAULT_GROUP_BYTES, build_demo_corpus
from shard_tools.tokenizer import train_bpe

__all__ = ["build_demo_mixture"]


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def build_demo_mixture(
    workdir: Path,
    root: str,
    *,
    bytes_per_group: int | None = None,
    vocab_size: int = 1024,
    seq_len: int = 128,
    say: Callable[[str], None] = _say,
) -> ConvertReport:
    """Demo corpus -> local BPE tokenizer -> per-group MDS streams under ``root``.

    ``root`` may be ``s3://``: the S3 environment must then be set (e.g. by
    ``S3Server.apply_env``). Returns the ``ConvertReport``. Shared by the demo and the
    benchmarks, so they all train on the same kind of data.
    """
    corpus_dir = Path(workdir) / "corpus"
    say(f"building the demo corpus from local text into {corpus_dir}/")
    groups = build_demo_corpus(corpus_dir, bytes_per_group or DEFAULT_GROUP_BYTES)
    for g in groups.values():
        say(f"  {g.name:>6}: {g.documents:5,} documents, {g.bytes / 1e6:4.1f} MB")

    tokenizer = Path(workdir) / "tokenizer.json"
    say(f"training a {vocab_size}-token byte-level BPE tokenizer -> {tokenizer}")
    texts = (
        json.loads(line)["text"]
        for g in groups.values()
        for line in Path(g.path).read_text(encoding="utf-8").splitlines()
    )
    train_bpe(texts, vocab_size, tokenizer)

    inputs = [InputSpec(str(g.path), group=g.name) for g in groups.values()]
    options = ConvertOptions(
        tokenizer=str(tokenizer),
        seq_len=seq_len,
        val_fraction=0.05,
        test_fraction=0.05,
        shard_size="1mb",
    )
    say(f"converting into {root} (one MDS stream per group and split)")
    report = convert(inputs, root, options)
    mb = report.input_bytes / 1e6
    say(f"converted {mb:.1f} MB in {report.seconds:.1f} s ({mb / report.seconds:.1f} MB/s)")
    return report
