"""Everyday mistakes get one line that says what is wrong: unreadable inputs, missing buckets.

Unreadable files are real: as root (which reads anything) the command runs without the
capabilities that bypass file permissions, through ``setpriv``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mixstream import storage
from mixstream.manifest import Manifest, ManifestError
from shard_tools.cli import main as shard_tools

ROOT = Path(__file__).resolve().parents[1]
NO_DAC = ["-dac_override", "-dac_read_search"]


def _shard_tools_unprivileged(*args: str) -> subprocess.CompletedProcess[str]:
    """``shard-tools ARGS`` in a process that file permissions apply to."""
    command = [sys.executable, "-m", "shard_tools.cli", *args]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "running as root: need util-linux setpriv to drop file capabilities"
        caps = ",".join(NO_DAC)
        command = [setpriv, "--bounding-set", caps, "--inh-caps", caps, *command]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def _unreadable(path: Path) -> Path:
    path.chmod(0)
    return path


@pytest.mark.slow
def test_unreadable_inputs_are_one_line_naming_the_path(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "hello world"}\n')
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"text": "no"}\n')
    folder = tmp_path / "folder"
    (folder / "inner").mkdir(parents=True)
    (folder / "inner" / "x.jsonl").write_text('{"text": "x"}\n')
    (folder / "y.jsonl").write_text('{"text": "y"}\n')
    cases = [
        (f"a={_unreadable(secret)}", f"{secret}: cannot read the file (permission denied)"),
        (
            f"a={folder}",
            f"{_unreadable(folder / 'inner')}: directory is not readable (permission denied)",
        ),
    ]
    try:
        for group, message in cases:
            out = str(tmp_path / "out")
            result = _shard_tools_unprivileged("convert", out, "-g", group, "--tokenizer", "byte")
            assert result.returncode == 2, result.stderr
            assert result.stderr == f"shard-tools convert: error: {message}\n"
            assert not Path(out).exists()
        # A folder that cannot be listed at all is not "a folder with no files".
        (folder / "inner").chmod(0o755)
        _unreadable(folder)
        result = _shard_tools_unprivileged("convert", out, "-g", f"a={folder}")
        assert result.stderr == (
            f"shard-tools convert: error: {folder}: directory is not readable (permission denied)\n"
        )
    finally:
        for path in (secret, folder, folder / "inner"):
            path.chmod(0o755)


def test_a_missing_bucket_is_called_a_missing_bucket(
    s3_env: object, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "s3://no-such-bucket-mixstream/corpus"
    # HEAD requests carry no error code: a missing bucket used to read "the object does not
    # exist" (e.g. shard-tools convert into it).
    with pytest.raises(storage.StorageError) as info:
        storage.check_writable(url)
    assert str(info.value).endswith(
        "S3 error NoSuchBucket; the bucket does not exist; create it or fix its name"
    )
    assert shard_tools(["convert", url, "-g", f"a={__file__}", "--format", "text"]) == 2
    assert "the bucket does not exist" in capsys.readouterr().err
    with pytest.raises(storage.StorageError) as info:
        storage.read_bytes(f"{url}/mixture.json")
    assert "the bucket does not exist; create it or fix its name" in str(info.value)
    assert "object does not exist" not in str(info.value)
    with pytest.raises(ManifestError, match="the bucket does not exist"):
        Manifest.load(url)
    assert shard_tools(["inspect", url]) == 2
    assert "the bucket does not exist" in capsys.readouterr().err
    # A missing object in a bucket that exists is still called a missing object.
    with pytest.raises(storage.StorageError, match="the object does not exist"):
        storage.read_bytes("s3://mixstream/no/such/object.json")
