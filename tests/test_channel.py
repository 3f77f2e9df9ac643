"""The trainer -> worker shared-memory channel: replay, horizon, isolation, stale reclaim."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mixstream.channel import PREFIX, UNBOUNDED, ScheduleChannel, reclaim_stale_segments
from mixstream.weights import WeightSchedule


def _reader(blob: bytes, queue: mp.Queue) -> None:
    channel = pickle.loads(blob)
    schedule = WeightSchedule()
    channel.wait_for(7, timeout=10)
    applied = channel.sync(schedule)
    queue.put((applied, schedule.to_list()))
    channel.close()


def test_updates_reach_another_process_and_horizon_blocks() -> None:
    channel = ScheduleChannel(2)
    try:
        channel.set_horizon(3)
        channel.publish(0, np.array([0.5, 0.5]))
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_reader, args=(pickle.dumps(channel), queue))
        proc.start()
        channel.publish(5, np.array([0.9, 0.1]))
        channel.set_horizon(8)  # releases the reader waiting for batch 7
        applied, schedule = queue.get(timeout=30)
        proc.join(10)
        # The reader was created after the first record, which its copy already holds.
        assert applied == [5]
        assert schedule == [[5, [0.9, 0.1]]]
    finally:
        channel.close()


def test_wait_for_times_out_with_a_clear_message() -> None:
    channel = ScheduleChannel(2)
    try:
        channel.set_horizon(2)
        channel.wait_for(1, timeout=0.1)
        with pytest.raises(TimeoutError, match="past the published horizon 2"):
            channel.wait_for(2, timeout=0.05)
        channel.set_horizon(UNBOUNDED)
        channel.wait_for(10**12, timeout=0.05)
    finally:
        channel.close()


def test_two_channels_in_one_process_do_not_collide() -> None:
    a, b = ScheduleChannel(2), ScheduleChannel(3)
    try:
        assert a.name != b.name
        a.publish(1, np.array([1.0, 0.0]))
        reader = pickle.loads(pickle.dumps(b))
        assert reader.sync(WeightSchedule()) == []
    finally:
        a.close()
        b.close()


def test_segment_of_a_killed_process_is_reclaimed_but_live_ones_are_kept(tmp_path: Path) -> None:
    code = (
        "import os, numpy as np\n"
        "from mixstream.channel import ScheduleChannel\n"
        "c = ScheduleChannel(2)\n"
        "print(c.name, flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    name = out.stdout.strip()
    assert name.startswith(PREFIX)
    live = ScheduleChannel(2)
    try:
        # The resource tracker of the killed process may already have unlinked it; if not,
        # reclaiming must. Either way it is gone, and our live segment stays.
        reclaim_stale_segments()
        assert not Path("/dev/shm", name).exists()
        assert Path("/dev/shm", live.name).exists()
        assert str(os.getpid()) in live.name
    finally:
        live.close()
    assert not Path("/dev/shm", live.name).exists()


def test_reader_that_falls_behind_the_ring_fails_loudly() -> None:
    channel = ScheduleChannel(2, capacity=4)
    try:
        reader = pickle.loads(pickle.dumps(channel))
        for i in range(6):
            channel.publish(i, np.array([0.5, 0.5]))
        with pytest.raises(RuntimeError, match="fell 6 weight updates behind"):
            reader.sync(WeightSchedule())
    finally:
        channel.close()
