"""Convert corpora into one MDS stream per data group, on local disk or S3.

from shard_tools import InputSpec, ConvertOptions, convert
convert([InputSpec("law/", group="law"), InputSpec("code.jsonl", group="code")],
        "s3://bucket/corpus", ConvertOptions(tokenizer="byte", seq_len=1024))
"""

from shard_tools.audit import format_table, inspect_mixture, verify_mixture
from shard_tools.convert import ConvertError, ConvertOptions, ConvertReport, convert
from shard_tools.sources import InputError, InputSpec
from shard_tools.tokenizer import train_bpe

__all__ = [
    "ConvertError",
    "ConvertOptions",
    "ConvertReport",
    "InputError",
    "InputSpec",
    "convert",
    "format_table",
    "inspect_mixture",
    "train_bpe",
    "verify_mixture",
]
