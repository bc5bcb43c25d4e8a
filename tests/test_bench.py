"""`make bench`'s quality check can fail (it printed "0.0000 vs 0.0000" and passed where neither model had learned)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_training", ROOT / "benchmarks" / "bench_training.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_the_quality_check_fails_when_fp32_learned_nothing_or_bf16_loses():
    assert bench.quality_verdict(0.0, 0.0, "bf16")[0] is False  # nothing learned: nothing judged
    assert "did not learn" in bench.quality_verdict(0.0, 0.0, "bf16")[1]
    assert bench.quality_verdict(0.70, 0.65, "bf16")[0] is False
    assert bench.quality_verdict(0.70, 0.69, "bf16")[0] is True
    assert bench.quality_verdict(0.70, 0.75, "bf16")[0] is True
