"""bench.fresh_memory measures every mode on a real file and reports the balloon's reporting state."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from bench import fresh_memory


def _direct_file(folder: Path, size: int) -> Path:
    path = folder / "weights.bin"
    path.write_bytes(os.urandom(size))
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError as exc:  # tmpfs has no O_DIRECT
        if exc.errno == errno.EINVAL:
            pytest.skip("no O_DIRECT on the temporary folder's filesystem")
        raise
    return path


def test_every_mode_is_measured_and_the_summary_names_them(tmp_path: Path) -> None:
    size = 8 << 20
    report = fresh_memory.run(_direct_file(tmp_path, size), size, rounds=2, settle=0.0, say=lambda _: None)
    assert set(report["median_s_per_gb"]) == set(fresh_memory.MODES)
    measured = {m: v for m, v in report["s_per_gb"].items() if m != "hugetlb" or v[0] is not None}
    assert all(len(samples) == 2 and all(s > 0 for s in samples) for samples in measured.values())
    text = fresh_memory.summary(report)
    assert all(mode in text for mode in fresh_memory.MODES) and "free page reporting" in text


def test_reporting_state_reads_the_kernel_parameters() -> None:
    state = fresh_memory.reporting_state()
    assert state["present"] == fresh_memory.REPORTING.is_dir()
    if state["present"]:
        assert isinstance(state["page_reporting_order"], int)
