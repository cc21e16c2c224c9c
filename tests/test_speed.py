"""bench-speed runs every timed part and writes the figures it reports (no timing is asserted)."""

from __future__ import annotations

import json

from conftest import TINY_PRESET
from dreamteacher.bench.speed import bench_speed, format_speed


def test_bench_speed_times_parts_whole_and_cache(tmp_path):
    out = tmp_path / "speed.json"
    results = bench_speed(preset=TINY_PRESET, steps=2, out=out, progress=False)
    assert json.loads(out.read_text()) == results
    seconds = results["seconds_per_step"]
    assert set(seconds) == {"data", "teacher", "student", "sum_of_parts", "whole", "whole_cached",
                            "teacher_without_early_exit"}
    assert all(value > 0 for value in seconds.values())
    assert results["step_over_parts"] == seconds["whole"] / seconds["sum_of_parts"]
    assert results["cache_speedup"] == seconds["whole"] / seconds["whole_cached"]
    assert results["images_per_second"] == 4 / seconds["whole"]
    assert results["peak_memory_mb"]["whole"] > 0
    flops = results["teacher_gflops_per_image"]
    assert 0 < flops["early_exit"] < flops["full"]  # the early exit skips the last decoder blocks
    text = format_speed(results)
    assert "whole / sum of parts" in text and "cache speedup" in text and "GFLOPs/image" in text


def test_trainers_keep_freed_host_memory_unless_turned_off(tmp_path, monkeypatch):
    import platform

    from dreamteacher.core.config import TrainerConfig
    from dreamteacher.engine import trainer as engine

    if platform.libc_ver()[0] == "glibc":
        assert engine.reuse_host_memory()  # mallopt accepted both settings
    calls = []
    monkeypatch.setattr(engine, "reuse_host_memory", lambda: calls.append(1) or True)
    engine.build_trainer(TrainerConfig(accelerator="cpu", devices=1, reuse_host_memory=True), tmp_path / "on", 1, 2,
                         progress=False)
    engine.build_trainer(TrainerConfig(accelerator="cpu", devices=1), tmp_path / "off", 1, 2, progress=False)  # the default
    assert calls == [1]
