"""bench.loaders' analysis: the bounds hermesd's load+run is held to."""

from __future__ import annotations

import pytest

from bench.loaders import analyse, markdown, phase_bound

GB = 10**9


def _run(name: str, **fields) -> dict:
    return {"name": name, "ok": True, **fields}


def _generate_runs(hermesd_total: float, prefill: float, decode: float) -> list[dict]:
    """One round of a capped 32-token generate: io-only reads the 2 GB model once in 1 s; hermesd reads
    it once per pass (64 GB)."""
    stats = {"compute_s": 20.0, "wait_s": 25.0}
    return [
        _run("io-only", latency_s=1.0, total_s=1.0, bytes_read=2 * GB),
        _run("compute-only", latency_s=prefill + decode, total_s=prefill + decode, prefill_s=prefill,
             decode_s=decode, output_sha256="aa"),
        _run("hermesd", total_s=hermesd_total, load_s=0.2, bytes_read=64 * GB, stats=stats, plan={},
             output_sha256="aa"),
        _run("hermesd-k0", total_s=60.0, output_sha256="aa"),
        _run("accelerate", total_s=120.0, output_sha256="aa"),
    ]


def test_generate_phase_bound_adds_the_prompt_pass_to_the_decode_reads() -> None:
    runs = _generate_runs(hermesd_total=48.0, prefill=12.0, decode=5.0)
    # prompt: max(1 s of reads, 12 s of compute); decode: max(62 GB at 2 GB/s, 5 s of compute)
    assert phase_bound(runs) == pytest.approx(12.0 + 31.0)
    result = analyse("llama", 700 << 20, runs)
    assert result["io_bound_s"] == pytest.approx(32.0)  # the whole run's reads, as if they all overlapped
    whole = result["checks"]["load+run <= 1.05 x max(io-only, compute-only)"]
    phases = result["checks"]["load+run <= 1.05 x phase bound (prompt, then decode)"]
    assert whole == {"pass": False, "ratio": round(48.0 / 32.0, 3)}
    assert phases == {"pass": False, "ratio": round(48.0 / 43.0, 3)}
    assert analyse("llama", 700 << 20, _generate_runs(44.0, 12.0, 5.0))["checks"][
        "load+run <= 1.05 x phase bound (prompt, then decode)"]["pass"] is True


def test_phase_bound_takes_compute_where_decoding_is_slower_than_its_reads() -> None:
    runs = _generate_runs(hermesd_total=80.0, prefill=12.0, decode=40.0)
    assert phase_bound(runs) == pytest.approx(12.0 + 40.0)


def test_a_single_forward_has_no_phase_bound_and_no_phase_check() -> None:
    runs = [
        _run("io-only", latency_s=1.0, bytes_read=GB),
        _run("compute-only", latency_s=3.0, total_s=3.0, prefill_s=3.0, output_sha256="bb"),
        _run("hermesd", total_s=3.3, load_s=0.2, bytes_read=GB, stats={"compute_s": 3.0, "wait_s": 0.0},
             plan={}, output_sha256="bb"),
    ]
    result = analyse("bert", 768 << 20, runs)
    assert phase_bound(runs) is None and result["phase_bound_s"] is None
    assert not any("phase" in check for check in result["checks"])
    assert result["checks"]["load+run <= 1.05 x max(io-only, compute-only)"]["ratio"] == 1.1
    assert "| bert | 3.30 s | - | - | 1.00 s | 3.00 s | - |" in markdown([result])
