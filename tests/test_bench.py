"""bench.py --real-size on the tiny shapes: the MoE shape builds from LLaDA2.0-mini's config with fewer experts,
and every mode times a step; FOCUS computes fewer rows in layers 2..L than the delayed cache, which computes fewer
than the full block."""
import json

import pytest

import bench


@pytest.mark.parametrize("shape", ["tiny", "tiny-moe"])
def test_real_size_runs_every_mode(tmp_path, shape, capsys):
    assert bench.main(["--real-size", "--real-size-config", shape, "--contexts", "32", "--device", "cpu",
                       "--out", str(tmp_path)]) == 0
    res = json.loads(next(tmp_path.glob("cpu-real-size-*.json")).read_text())["real_size"]
    assert res["config"].get("model_type", "sdar") == {"tiny": "sdar", "tiny-moe": "llada2_moe"}[shape]
    rows = {r["mode"]: r for r in res["end_to_end"]}
    assert list(rows) == ["full", "delayed", "focus-1.5"]
    assert all(r["ms_per_step"] > 0 and r["steps"] > 0 for r in rows.values())
    assert rows["focus-1.5"]["computed_deep_per_step"] < rows["delayed"]["computed_deep_per_step"] < 32
    assert rows["full"]["computed_deep_per_step"] == 32
    assert {p["Q"] for p in res["probe"]} >= {32, 16, 8, 4}
