"""``mixture.json``: the contract between ``shard-tools convert`` and the datasets.

One file at the root of a converted corpus names every group, where its ``train``/``val``/
``test`` MDS streams live (paths relative to the manifest, so a corpus can be copied or
moved between buckets as a unit), how samples are encoded, and what the conversion counted.
It is written last, so its presence means every stream it names is complete.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from mixstream import storage
from mixstream.shardindex import IndexDigest, check_path

__all__ = ["MANIFEST_NAME", "SPLITS", "GroupInfo", "Manifest", "ManifestError", "SplitInfo"]

MANIFEST_NAME = "mixture.json"
SPLITS = ("train", "val", "test")
FORMAT = "mixstream.mixture"
VERSION = 1
GROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
XXH64 = re.compile(r"^[0-9a-f]{16}$")


class ManifestError(ValueError):
    """A manifest is missing, malformed, or does not contain what was asked for."""


def check_group_name(name: str) -> str:
    """Group names become path components and metric names, so keep them plain."""
    if not GROUP_NAME.match(name):
        raise ManifestError(
            f"invalid group name {name!r}: use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class SplitInfo:
    """One MDS stream: a split of a group.

    ``index_bytes``/``index_xxh64`` identify the stream's ``index.json`` (see
    :class:`~mixstream.shardindex.IndexDigest`); manifests written before they existed have
    neither, and their streams' cached indexes are then not checked against the store.
    """

    path: str
    documents: int
    samples: int
    tokens: int | None
    text_bytes: int
    stored_bytes: int
    raw_bytes: int
    shards: int
    # The stream's length sidecar (mixstream.tokens): {"basename", "bytes", "xxh64"}; text
    # streams only (packed ones are seq_len each), absent from manifests written before it.
    lengths: dict[str, Any] | None = None
    index_bytes: int | None = None
    index_xxh64: str | None = None

    @property
    def index_digest(self) -> IndexDigest | None:
        if self.index_bytes is None or self.index_xxh64 is None:
            return None
        return IndexDigest(self.index_bytes, self.index_xxh64)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; no digest fields when there is no digest and no ``lengths`` for
        streams without a sidecar (as older manifests)."""
        obj = asdict(self)
        if self.index_digest is None:
            del obj["index_bytes"], obj["index_xxh64"]
        if obj["lengths"] is None:
            del obj["lengths"]
        return obj

    def check(self, what: str, where: str) -> None:
        """Refuse digest fields of the wrong type (the manifest is untrusted input)."""
        size, digest = self.index_bytes, self.index_xxh64
        if (size is None) != (digest is None):
            raise ManifestError(
                f"{where}: {what} has only one of index_bytes and index_xxh64; give both or "
                "neither (re-convert the corpus to record them)"
            )
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise ManifestError(
                f"{where}: {what} index_bytes is {size!r}; expected a non-negative integer"
            )
        if digest is not None and not (isinstance(digest, str) and XXH64.match(digest)):
            raise ManifestError(
                f"{where}: {what} index_xxh64 is {digest!r}; expected 16 lowercase hex digits"
            )


@dataclass(frozen=True)
class GroupInfo:
    """A group and its streams per split."""

    name: str
    splits: dict[str, SplitInfo]
    sources: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Manifest:
    """A converted multi-group corpus.

    ``sample`` describes the encoding: ``{"format": "tokens", "column": "input_ids",
    "seq_len": 2048, "dtype": "uint16"}`` or ``{"format": "text", "column": "text"}``.
    ``root`` is where the manifest was loaded from; it is not serialized.
    """

    groups: dict[str, GroupInfo]
    sample: dict[str, Any]
    tokenizer: dict[str, Any] | None
    holdout: dict[str, Any]
    root: str = ""
    created_by: str = "shard-tools"

    @property
    def group_names(self) -> list[str]:
        return list(self.groups)

    def split(self, group: str, split: str) -> SplitInfo:
        if group not in self.groups:
            raise ManifestError(
                f"group {group!r} is not in {self.location}; groups: {', '.join(self.groups)}"
            )
        splits = self.groups[group].splits
        if split not in splits:
            raise ManifestError(
                f"group {group!r} has no {split!r} split in {self.location}; "
                f"splits: {', '.join(splits)}"
            )
        return splits[split]

    def stream_url(self, group: str, split: str = "train") -> str:
        """Absolute local path or ``s3://`` URL of one stream."""
        return storage.join(self.root, self.split(group, split).path)

    @property
    def location(self) -> str:
        return storage.join(self.root, MANIFEST_NAME) if self.root else MANIFEST_NAME

    def to_json(self) -> bytes:
        obj = {
            "format": FORMAT,
            "version": VERSION,
            "created_by": self.created_by,
            "sample": self.sample,
            "tokenizer": self.tokenizer,
            "holdout": self.holdout,
            "groups": {
                name: {
                    "sources": g.sources,
                    "splits": {s: info.to_dict() for s, info in g.splits.items()},
                }
                for name, g in self.groups.items()
            },
        }
        return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes | str, root: str = "") -> Manifest:
        where = storage.join(root, MANIFEST_NAME) if root else MANIFEST_NAME
        try:
            obj = json.loads(data)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{where} is not valid JSON: {exc}") from None
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ManifestError(f"{where} is not a mixstream manifest (no format={FORMAT!r})")
        if obj.get("version") != VERSION:
            raise ManifestError(
                f"{where} has manifest version {obj.get('version')!r}; this mixstream reads "
                f"version {VERSION}; re-run shard-tools convert with this version"
            )
        try:
            groups = {
                name: GroupInfo(
                    name=check_group_name(name),
                    sources=list(g.get("sources", [])),
                    splits={s: SplitInfo(**info) for s, info in g["splits"].items()},
                )
                for name, g in obj["groups"].items()
            }
            for name, g in groups.items():
                for split, info in g.splits.items():
                    info.check(f"{name}/{split}", where)
                    # Streams are read from (and cached under) root/path: keep them inside.
                    check_path(info.path, root, f"{name}/{split} stream path", where, ManifestError)
            return cls(
                groups=groups,
                sample=obj["sample"],
                tokenizer=obj.get("tokenizer"),
                holdout=obj.get("holdout", {}),
                root=root,
                created_by=obj.get("created_by", "shard-tools"),
            )
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"{where} is malformed: {exc!r}") from None

    @classmethod
    def load(cls, url: str, retry_seconds: float = 0.0) -> Manifest:
        """Load from a manifest URL or from the corpus root that contains it (transient S3
        errors retried for ``retry_seconds``)."""
        url = str(url).rstrip("/")
        if url.endswith(".json"):
            root = url.rsplit("/", 1)[0] if "/" in url else "."
        else:
            root, url = url, storage.join(url, MANIFEST_NAME)
        try:
            data = storage.read_bytes(url, retry_seconds)
        except storage.StorageError as exc:
            raise ManifestError(
                f"no mixture manifest at {url} ({exc}); convert a corpus with "
                "`shard-tools convert` or point at its root"
            ) from None
        return cls.from_json(data, root=root)

    def save(self, root: str) -> None:
        storage.write_bytes(storage.join(root, MANIFEST_NAME), self.to_json())
