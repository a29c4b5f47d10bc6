"""bench.cgroup: groups are made, capped, recorded and removed; OOM kills are counted; records parse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import cgroup

MIB = 1 << 20
HOG = "import sys; blocks = [bytearray(16 << 20) for _ in range(int(sys.argv[1]))]; print('done')"


def _capped_or_reason() -> str | None:
    return cgroup.unavailable_reason()


def test_record_parses_v1_files(tmp_path: Path) -> None:
    (tmp_path / "memory.max_usage_in_bytes").write_text("123456\n")
    (tmp_path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert cgroup.read_record(tmp_path, "v1") == (123456, 2)


def test_record_parses_v2_files_with_and_without_peak(tmp_path: Path) -> None:
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\noom_group_kill 0\n")
    assert cgroup.read_record(tmp_path, "v2") == (0, 1)  # kernels before 5.19 have no memory.peak
    (tmp_path / "memory.peak").write_text("999\n")
    assert cgroup.read_record(tmp_path, "v2") == (999, 1)


def test_v2_group_writes_its_limit_and_is_removed(tmp_path: Path) -> None:
    # A directory stands in for a v2 hierarchy: the group's own files are written, then cleaned up
    # by the test (a real cgroupfs removes them with the directory).
    group = cgroup.MemoryGroup(64 * MIB, root=tmp_path, version="v2")
    group.path.mkdir()
    group.path.rmdir()
    with group:
        assert (group.path / "memory.max").read_text() == str(64 * MIB)
        for child in group.path.iterdir():
            child.unlink()
    assert not group.path.exists()


@pytest.mark.skipif(_capped_or_reason() is not None, reason="no writable cgroup memory controller")
def test_capped_child_within_the_cap_runs_and_the_group_is_removed() -> None:
    with cgroup.MemoryGroup(256 * MIB) as group:
        path = group.path
        done = subprocess.run([sys.executable, "-c", HOG, "2"], capture_output=True, text=True,
                              preexec_fn=group.join, timeout=60)
        record = group.record()
        assert path.is_dir()
    assert done.returncode == 0 and done.stdout.strip() == "done"
    assert record.oom_kills == 0 and 32 * MIB <= record.peak_bytes <= 256 * MIB
    assert not path.exists()


@pytest.mark.skipif(_capped_or_reason() is not None, reason="no writable cgroup memory controller")
def test_child_over_the_cap_is_oom_killed_and_counted() -> None:
    run = cgroup.run_capped([sys.executable, "-c", HOG, "24"], 128 * MIB, timeout=60)  # 384 MiB in 128
    assert run.returncode == -9 and run.oom_kills >= 1
    assert run.peak_bytes <= 128 * MIB


@pytest.mark.skipif(_capped_or_reason() is not None, reason="no writable cgroup memory controller")
def test_remove_kills_what_is_left_in_the_group() -> None:
    group = cgroup.MemoryGroup(128 * MIB)
    with group:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], preexec_fn=group.join)
        assert group.pids() == [proc.pid]
    assert proc.wait(timeout=10) == -9
    assert not group.path.exists()
