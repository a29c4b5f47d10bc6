"""bench.harness: page-cache eviction (checked with fincore), child result parsing, helpers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bench.harness import (
    evict,
    make_cold,
    median,
    proc_read_bytes,
    resident_bytes,
    run_json_child,
    vm_hwm_bytes,
    weight_files,
)

MIB = 1 << 20


def _written_file(tmp_path: Path, name: str = "w.safetensors", size: int = 4 * MIB) -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))  # dirty pages: eviction must flush them first
    path.read_bytes()
    return path


def test_weight_files_finds_safetensors_recursively(tmp_path: Path) -> None:
    (tmp_path / "stages").mkdir()
    for name in ("stages/b.safetensors", "a.safetensors", "config.json"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in weight_files(tmp_path)] == [
        "a.safetensors", "stages/b.safetensors"]


def test_evict_drops_written_files_from_the_page_cache(tmp_path: Path) -> None:
    files = [_written_file(tmp_path, f"w{i}.safetensors") for i in range(2)]
    if resident_bytes(files) == 0:  # tmpfs or a filesystem that never caches: nothing to prove here
        assert make_cold(files) == 0
        return
    assert resident_bytes(files) >= 4 * MIB
    evict(files)
    assert resident_bytes(files) == 0
    files[0].read_bytes()
    assert make_cold(files) == 0


def test_run_json_child_returns_the_last_json_line(tmp_path: Path) -> None:
    code = "import json; print('noise'); print(json.dumps({'a': 1})); print('{not json'); print(json.dumps({'b': 2}))"
    result = run_json_child([sys.executable, "-c", code], timeout=60)
    assert result["ok"] is True and result["b"] == 2 and "a" not in result and result["child_wall_s"] > 0


def test_run_json_child_reports_failures_with_status_and_stderr() -> None:
    result = run_json_child([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"], timeout=60)
    assert result["ok"] is False and result["returncode"] == 3 and result["error"] == "exit status 3"
    assert result["stderr_tail"].endswith("boom")
    silent = run_json_child([sys.executable, "-c", "print('no json')"], timeout=60)
    assert silent["ok"] is False and silent["error"] == "no JSON line on stdout"
    slow = run_json_child([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert slow["ok"] is False and slow["error"].startswith("timed out")


def test_run_json_child_runs_preexec_in_the_child(tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    code = "import json, os; print(json.dumps({'pid': os.getpid()}))"
    result = run_json_child([sys.executable, "-c", code], timeout=60,
                            preexec_fn=lambda: marker.write_text(str(os.getpid())))
    assert int(marker.read_text()) == result["pid"]


def test_median_and_process_counters() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0 and median([]) is None
    assert vm_hwm_bytes() > 0 and proc_read_bytes() >= 0


def test_cpu_counters_see_a_childs_work() -> None:
    from bench.harness import children_cpu_s, cpu_busy_s

    busy, kids = cpu_busy_s(), children_cpu_s()
    run_json_child([sys.executable, "-c", "import json; sum(range(3_000_000)); print(json.dumps({}))"], timeout=60)
    assert children_cpu_s() > kids and cpu_busy_s() >= busy
