"""``shard-tools``: convert corpora into per-group MDS streams and look at the result."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from mixstream.manifest import ManifestError
from mixstream.shardindex import ShardIndexError
from mixstream.storage import StorageError
from shard_tools.audit import format_table, inspect_mixture, verify_mixture
from shard_tools.convert import DEFAULT_SHARD_SIZE, ConvertError, ConvertOptions, convert
from shard_tools.sources import DEFAULT_CHUNK_BYTES, InputError, InputSpec

EXPECTED_ERRORS = (InputError, ConvertError, ManifestError, ShardIndexError, StorageError)


def _group_arg(value: str) -> InputSpec:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return InputSpec(path=path, group=name)


def _size_arg(value: str) -> int:
    from streaming.base.util import bytes_to_int

    try:
        return bytes_to_int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {value!r} (e.g. 64mb)") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shard-tools", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "convert",
        help="convert JSONL/Parquet/text into one MDS stream per group",
        description="Convert a corpus into per-group train/val/test MDS streams and a "
        "mixture.json manifest, locally or on S3.",
    )
    p.add_argument("out", help="output root: a local directory or s3://bucket/prefix")
    p.add_argument("inputs", nargs="*", help="inputs whose group is read from --group-field")
    p.add_argument(
        "--group",
        "-g",
        action="append",
        type=_group_arg,
        default=[],
        metavar="NAME=PATH",
        help="an input file or directory that belongs to group NAME (repeatable)",
    )
    p.add_argument("--group-field", help="dotted record field naming the group, e.g. meta.set")
    p.add_argument("--text-field", default="text", help="dotted record field holding the text")
    p.add_argument("--format", choices=["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "text"])
    p.add_argument(
        "--tokenizer",
        help="'byte', a tokenizer.json path, or a Hugging Face name; omit to store raw text",
    )
    p.add_argument("--eos-token", help="EOS token of the tokenizer (default: auto-detect)")
    p.add_argument(
        "--length-tokenizer",
        default="byte",
        help="raw-text output: tokenizer whose counts the per-sample length sidecar records "
        "(for weight_unit='tokens'); default 'byte' (UTF-8 bytes + EOS)",
    )
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per packed sample")
    p.add_argument("--dtype", choices=["uint16", "uint32"], help="token dtype (default: auto)")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--test-fraction", type=float, default=0.01)
    p.add_argument("--split-seed", type=int, default=0, help="seed of the held-out hash")
    p.add_argument("--shard-size", type=_size_arg, default=DEFAULT_SHARD_SIZE)
    p.add_argument("--compression", default="zstd", help="MDS compression, e.g. zstd or zstd:7")
    p.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    p.add_argument(
        "--chunk-size",
        type=_size_arg,
        default=DEFAULT_CHUNK_BYTES,
        help="input bytes per parallel task",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed records, count them")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("inspect", help="print a per-group table of a converted corpus")
    p.add_argument("root", help="corpus root or mixture.json (local or s3://)")

    p = sub.add_parser("verify", help="re-read every shard and check hashes and counts")
    p.add_argument("root", help="corpus root or mixture.json (local or s3://)")

    p = sub.add_parser("demo-corpus", help="build a small multi-group corpus from local text")
    p.add_argument("out", help="directory for <group>.jsonl files")
    p.add_argument("--bytes-per-group", type=_size_arg, default=None)

    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer.json locally")
    p.add_argument("out", help="path of the tokenizer.json to write")
    p.add_argument("inputs", nargs="+", help="JSONL/Parquet/text files or directories")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--text-field", default="text")
    p.add_argument("--format", choices=["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "text"])
    return parser


def _convert(args: argparse.Namespace) -> int:
    inputs = [InputSpec(path) for path in args.inputs] + list(args.group)
    options = ConvertOptions(
        tokenizer=args.tokenizer,
        eos_token=args.eos_token,
        length_tokenizer=args.length_tokenizer,
        seq_len=args.seq_len,
        dtype=args.dtype,
        text_field=args.text_field,
        group_field=args.group_field,
        format=args.format,
        skip_bad=args.skip_bad,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        split_seed=args.split_seed,
        shard_size=args.shard_size,
        compression=args.compression,
        workers=args.workers,
        chunk_bytes=args.chunk_size,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    report = convert(inputs, args.out, options)
    mb = report.input_bytes / 1e6
    print(
        f"converted {mb:.1f} MB in {report.seconds:.1f} s ({mb / max(report.seconds, 1e-9):.1f} "
        f"MB/s) into {len(report.manifest.groups)} groups at {args.out}"
    )
    if report.bad_records:
        print(f"skipped {report.bad_records} bad records, e.g.:", file=sys.stderr)
        for line in report.first_errors:
            print(f"  {line}", file=sys.stderr)
    if report.empty_documents:
        print(f"skipped {report.empty_documents} empty documents")
    if report.dropped_tokens:
        print(f"dropped {report.dropped_tokens} trailing tokens (less than one sequence)")
    return _inspect(argparse.Namespace(root=args.out))


def _inspect(args: argparse.Namespace) -> int:
    manifest, rows = inspect_mixture(args.root)
    print(format_table(rows))
    if manifest.tokenizer:
        tok = manifest.tokenizer
        print(
            f"tokenizer: {tok['name']} (vocab {tok['vocab_size']}, eos {tok['eos_id']}); "
            f"samples: {manifest.sample.get('seq_len')} x {manifest.sample.get('dtype')}"
        )
    return 0


def _verify(args: argparse.Namespace) -> int:
    report = verify_mixture(args.root)
    for problem in report.problems:
        print(f"FAIL {problem}", file=sys.stderr)
    status = "OK" if report.ok else f"{len(report.problems)} problems"
    print(
        f"verified {report.streams} streams, {report.shards} shards, {report.samples:,} "
        f"samples, {report.bytes / 1e6:.1f} MB: {status}"
    )
    return 0 if report.ok else 1


def _demo_corpus(args: argparse.Namespace) -> int:
    from shard_tools.demo_corpus import DEFAULT_GROUP_BYTES, build_demo_corpus

    groups = build_demo_corpus(args.out, args.bytes_per_group or DEFAULT_GROUP_BYTES)
    for g in groups.values():
        print(f"{g.name:>8}: {g.documents:6,} documents, {g.bytes / 1e6:5.1f} MB -> {g.path}")
    return 0


def _train_tokenizer(args: argparse.Namespace) -> int:
    from shard_tools.sources import ReadOptions, ReadStats, plan_tasks, read_documents
    from shard_tools.tokenizer import train_bpe

    options = ReadOptions(text_field=args.text_field, format=args.format)
    tasks = plan_tasks([InputSpec(p, group="all") for p in args.inputs], options)
    stats = ReadStats()
    texts = (doc.text for task in tasks for doc in read_documents(task, options, stats))
    try:
        path = train_bpe(texts, args.vocab_size, args.out)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    print(f"wrote {path} (vocab {args.vocab_size})")
    return 0


COMMANDS = {
    "convert": _convert,
    "inspect": _inspect,
    "verify": _verify,
    "demo-corpus": _demo_corpus,
    "train-tokenizer": _train_tokenizer,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Inputs may follow options (`convert OUT --group-field f a.jsonl b.jsonl`).
    if args.command == "convert" and not any(e.startswith("-") for e in extra):
        args.inputs += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=os.environ.get("MIXSTREAM_LOG_LEVEL", "WARNING"))
    try:
        return COMMANDS[args.command](args)
    except EXPECTED_ERRORS as exc:
        print(f"shard-tools {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"shard-tools {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
