"""bench.suite_report: medians, derived metrics, target verdicts, markdown, and BENCHMARKS.md updates."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import suite_report

GB = 1e9


def _run(name: str, ok: bool = True, **metrics: float) -> dict:
    return {"name": name, "ok": ok, **metrics}


RUNS = [
    _run("hermesd", total_s=4.0, latency_s=3.0, peak_rss_bytes=900e6, streamed_bytes=6 * GB, bytes_per_pass=6 * GB,
         output_sha256="aa"),
    _run("hermesd", total_s=6.0, latency_s=5.0, peak_rss_bytes=800e6, streamed_bytes=6 * GB, bytes_per_pass=6 * GB,
         output_sha256="aa"),
    _run("hermesd", total_s=5.0, latency_s=4.0, peak_rss_bytes=850e6, streamed_bytes=6 * GB, bytes_per_pass=6 * GB,
         output_sha256="aa"),
    _run("standard", total_s=16.0, latency_s=14.0, peak_rss_bytes=1e9, output_sha256="aa"),
    {"name": "standard", "ok": False, "error": "exit status -9", "oom_kills": 1},
    _run("accelerate", total_s=12.0, latency_s=11.0, output_sha256="bb"),
    _run("io-only", total_s=3.0, latency_s=3.0, gb_per_s=2.0),
    _run("compute-only", total_s=2.5, latency_s=2.5, output_sha256="aa"),
]
NAMES = ["hermesd", "standard", "accelerate", "io-only", "compute-only"]


def test_summarize_takes_medians_and_counts_failures_and_oom_kills() -> None:
    summary = suite_report.summarize(RUNS, NAMES)
    assert summary["hermesd"]["total_s"] == 5.0 and summary["hermesd"]["runs"] == 3
    assert summary["standard"]["runs"] == 1 and summary["standard"]["failed"] == 1
    assert summary["standard"]["oom_kills"] == 1
    assert summary["standard"]["errors"] == ["OOM-killed (exit status -9)"]


def test_derived_efficiency_uses_the_larger_bound() -> None:
    extra = suite_report.derived(suite_report.summarize(RUNS, NAMES))
    assert extra["io_bound_s"] == pytest.approx(3.0)  # 6 GB at 2 GB/s
    assert extra["compute_bound_s"] == 2.5
    assert extra["efficiency"] == pytest.approx(3.0 / 4.0)
    assert extra["decode_tokens_per_s_read_bound"] == pytest.approx(1 / 3)


def test_gpt2xl_targets_and_verdicts() -> None:
    summary = suite_report.summarize(RUNS, NAMES)
    ratios = suite_report.ratios("gpt2-xl", summary, suite_report.derived(summary), standard_uncapped_peak=6.4e9)
    verdicts = {r.label.split(",")[0]: (round(r.value, 3), r.verdict) for r in ratios}
    assert verdicts["accelerate / hermesd"] == (2.4, "MISS")
    assert verdicts["standard / hermesd"] == (3.2, "PASS")
    assert verdicts["pipeline efficiency max(io-only"][1] == "MISS"
    assert verdicts["peak RSS hermesd / standard without a cap"] == (0.133, "PASS")


def test_missing_contenders_give_na_not_errors() -> None:
    summary = suite_report.summarize(RUNS, ["hermesd"])
    ratios = suite_report.ratios("llama-1b", summary, suite_report.derived(summary))
    assert [r.verdict for r in ratios[:2]] == ["n/a", "n/a"]
    assert all(r.verdict == "info" for r in suite_report.ratios("minilm", summary, {}))


def _result() -> dict:
    summary = suite_report.summarize(RUNS, NAMES)
    extra = suite_report.derived(summary)
    return {"title": "T", "workload": "w", "dtype": "float32", "weight_bytes": 2 << 30, "repeats": 3,
            "cap_text": "1,024 MiB", "plan_text": "k=2", "summary": summary, "derived": extra,
            "ratio_objects": suite_report.ratios("gpt2-xl", summary, extra, 6.4e9)}


def test_section_shows_table_ratios_agreement_and_failures() -> None:
    text = suite_report.scenario_section(_result())
    assert "| hermesd | 3/0 (0) | 5.00 | 4.00 |" in text
    assert "| standard | 1/1 (1) |" in text
    assert "(target >= 3): MISS" in text
    assert "hermesd identical" in text and "accelerate DIFFERENT" in text
    assert "- standard failed: OOM-killed" in text


def test_write_section_inserts_then_replaces(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nintro\n\n## Older section\n\nold numbers\n")
    suite_report.write_section(path, "## Suite\n\nfirst")
    text = path.read_text()
    assert text.index("first") < text.index("## Older section") and "intro" in text
    suite_report.write_section(path, "## Suite\n\nsecond")
    text = path.read_text()
    assert "second" in text and "first" not in text and text.count(suite_report.START) == 1
    assert text.endswith("old numbers\n")
    fresh = tmp_path / "new.md"
    suite_report.write_section(fresh, "## Suite\n\nx")
    assert fresh.read_text().startswith("# Benchmarks") and suite_report.END in fresh.read_text()


def test_in_run_efficiency_uses_hermesds_own_compute_time() -> None:
    runs = RUNS + [_run("hermesd", total_s=5.0, latency_s=4.0, streamed_bytes=6 * GB,
                        stats={"wait_s": 0.2, "compute_s": 3.8})]
    extra = suite_report.derived(suite_report.summarize(runs, NAMES))
    assert extra["hermesd_wait_s"] == 0.2 and extra["hermesd_compute_s"] == 3.8
    assert extra["efficiency_in_run"] == pytest.approx(3.8 / 4.0)
