"""DynamicStreamingDataset inside Composer's Trainer: checkpointed state and autoresume after
a real kill (SIGKILL of the training process) continue the exact batch sequence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).with_name("composer_harness.py")
CHANGES = {"3": {"alpha": 0.8, "beta": 0.1, "gamma": 0.1}, "7": {"alpha": 0.0, "beta": 1.0}}


def run(cfg: dict, tmp: Path, name: str, expect_kill: bool = False) -> list[dict]:
    cfg_path = tmp / f"{name}.json"
    cfg_path.write_text(json.dumps(cfg))
    proc = subprocess.run(
        [sys.executable, str(HARNESS), str(cfg_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if expect_kill:
        assert proc.returncode == -9, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in Path(cfg["log_path"]).read_text().splitlines()]


@pytest.mark.parametrize("workers", [0, 2])
def test_autoresume_after_kill_continues_exactly(
    mixture: str, tmp_path: Path, workers: int
) -> None:
    base = {
        "manifest": mixture,
        "batch_size": 4,
        "num_workers": workers,
        "max_duration": "12ba",
        "changes": CHANGES,
        "save_interval": "4ba",
    }
    reference = run(
        {**base, "save_folder": str(tmp_path / "ref"), "log_path": str(tmp_path / "ref.log")},
        tmp_path,
        "ref",
    )
    assert [r["batch"] for r in reference] == list(range(12))

    crash = {**base, "save_folder": str(tmp_path / "run"), "autoresume": True}
    killed = run(
        {**crash, "kill_at": 10, "log_path": str(tmp_path / "killed.log")},
        tmp_path,
        "killed",
        expect_kill=True,
    )
    assert [r["batch"] for r in killed] == list(range(10))
    assert killed == reference[:10]

    resumed = run({**crash, "log_path": str(tmp_path / "resumed.log")}, tmp_path, "resumed")
    # The last checkpoint before the kill was at batch 8: batches 8..11 replay exactly.
    assert [r["batch"] for r in resumed] == [8, 9, 10, 11]
    assert resumed == reference[8:]
