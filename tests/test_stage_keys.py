"""The camvid-cpu bench's stage and cell keys are what its committed results were computed under: a
code change that alters one would make the next `bench` recompute hours of finished work (or, for a
change of computation, must). tests/fixtures/camvid-cpu-stage-keys.txt holds them, as
`benchmarks/experiments/stage_keys.py camvid-cpu` prints them; when a change of keys is intended,
regenerate the file with that command and say so in the commit."""

from __future__ import annotations

import pytest

from conftest import CAMVID, REPO

FIXTURE = REPO / "tests" / "fixtures" / "camvid-cpu-stage-keys.txt"


@pytest.mark.skipif(not CAMVID.is_dir(), reason="needs ../shared/data/camvid")
def test_the_camvid_cpu_stage_keys_are_those_of_the_committed_results(tmp_path, monkeypatch):
    from dreamteacher.bench import cells, runner, stages

    keys: list[tuple[str, str]] = []
    out = tmp_path / "keys"

    def stub(self, allow_run=True):
        keys.append((str(self.folder.relative_to(out.resolve() / "runs")), self.key))
        return {"key": self.key, "done": True, "seconds": 0.0, "steps": 0, "epochs": 0, "iterations": 0,
                "labeled": 0, "teacher": str(self.folder / "teacher"), "backbone": "b", "cache": "c",
                "interpreter": str(self.folder), "run": "r", "initialized": "none"}

    monkeypatch.setattr(stages.Stage, "result", stub)
    monkeypatch.setattr(cells, "score", lambda *a, **k: {"miou": 0.0, "per_class": [], "pixel_accuracy": 0.0,
                                                          "scores": {}, "inference_gflops": 0})
    monkeypatch.setattr(runner, "write_results", lambda out, meta, rows: {"md": out / "results.md"})
    runner.bench("camvid-cpu", out, data_root=CAMVID, progress=False)
    now = sorted(set(keys))
    expected = [tuple(line.split()) for line in FIXTURE.read_text().splitlines() if line.strip()]
    changed = sorted({folder for folder, key in set(now) ^ set(expected)})
    assert now == expected, f"stage keys changed for {changed[:8]} ({len(changed)} in all)"
