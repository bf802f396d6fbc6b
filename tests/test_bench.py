"""bench.py --real-size on the tiny shapes: the MoE shape builds from LLaDA2.0-mini's config with fewer experts,
and every mode times a step; FOCUS computes fewer rows in layers 2..L than the delayed cache, which computes fewer
than the full block; the shipped model's schedules are replayed."""
import contextlib
import json

import pytest

import bench
import shapes


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["tiny", "tiny-moe"])
def test_real_size_runs_every_mode(tmp_path, shape, capsys):
    replayed = 2 if shape == "tiny" else 0   # schedules of the shipped model on 2 problems
    assert bench.main(["--real-size", "--real-size-config", shape, "--contexts", "32", "--device", "cpu",
                       "--replay-problems", str(replayed), "--replay-workload", "arith", "--out", str(tmp_path)]) == 0
    res = json.loads(next(tmp_path.glob("cpu-real-size-*.json")).read_text())["real_size"]
    assert res["config"].get("model_type", "sdar") == {"tiny": "sdar", "tiny-moe": "llada2_moe"}[shape]
    rows = {r["mode"]: r for r in res["end_to_end"]}
    assert list(rows) == ["full", "delayed", "focus-1.5"]
    assert all(r["ms_per_step"] > 0 and r["steps"] > 0 for r in rows.values())
    assert rows["focus-1.5"]["computed_deep_per_step"] < rows["delayed"]["computed_deep_per_step"] < 32
    assert rows["full"]["computed_deep_per_step"] == 32
    assert {p["Q"] for p in res["probe"]} >= {32, 16, 8, 4}
    probe = {p["Q"]: p for p in res["probe"]}
    focus_row = next(p for p in res["probe"] if "kept_per_seq" in p)   # FOCUS against its row-count prediction
    layers = res["config"]["num_hidden_layers"]
    per_layer = {q: probe[q]["ms"] / layers for q in (32, 16, 8, 4)}
    lowest = 2 * per_layer[32] + (layers - 2) * min(per_layer.values()) + focus_row["logits_ms"]
    assert focus_row["predicted_ms"] >= lowest * (1 - 1e-9)
    assert focus_row["over_prediction"] == pytest.approx(focus_row["ms"] / focus_row["predicted_ms"])
    # its parts: layers 0-1 (two layers at 32 rows) and the rest, whose graph is predicted without the logits
    assert focus_row["early_predicted_ms"] == pytest.approx(2 * per_layer[32])
    assert focus_row["early_predicted_ms"] + focus_row["late_predicted_ms"] == pytest.approx(focus_row["predicted_ms"])
    assert focus_row["late_layers_predicted_ms"] == pytest.approx(focus_row["late_predicted_ms"] - focus_row["logits_ms"])
    assert all(focus_row[k] > 0 for k in ("early_ms", "late_ms", "late_layers_ms"))
    assert 32 < focus_row["late_keys"] <= 32 + 32                        # context 32, up to the block's last kept row
    if replayed:  # the shipped model's schedules: FOCUS takes more steps than the delayed cache, and decodes less a step
        rows = {r["mode"]: r for r in res["replayed"]}
        assert list(rows) == ["full", "delayed", "focus-1.5", "paper-focus-1.5@0.8"]
        assert rows["focus-1.5"]["steps"] > rows["delayed"]["steps"]
        assert rows["focus-1.5"]["decoded_per_step"] < rows["delayed"]["decoded_per_step"]
        assert rows["paper-focus-1.5@0.8"]["threshold"] == 0.8
    else:
        assert "replayed" not in res


def test_an_interrupt_is_one_line_and_leaves_no_empty_file(tmp_path, monkeypatch, capsys):
    def interrupted(args, device, save):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "bench_real_size", interrupted)
    code = bench.main(["--real-size", "--real-size-config", "tiny", "--device", "cpu", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and err == ["interrupted; nothing had finished"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failure", [RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't "
                                                  "allocate memory: you tried to allocate 40000000000 bytes"),
                                     MemoryError()])
def test_running_out_of_memory_is_one_line(tmp_path, monkeypatch, capsys, failure):
    def too_big(args, device, save):
        raise failure
    monkeypatch.setattr(bench, "bench_real_size", too_big)
    code = bench.main(["--real-size", "--real-size-config", "tiny", "--device", "cpu", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: out of memory") and "--contexts" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_a_real_size_run_stopped_part_way_keeps_what_finished(tmp_path, monkeypatch):
    """Each measurement is saved as it finishes: a run killed after its probes (a time limit) leaves them in the
    partial file."""
    def killed_after_the_probes(model, *args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "run_mode", killed_after_the_probes)
    code = bench.main(["--real-size", "--real-size-config", "tiny", "--contexts", "32", "--device", "cpu",
                       "--replay-problems", "0", "--out", str(tmp_path)])
    partial = json.loads(next(tmp_path.glob("*.partial")).read_text())
    assert code == 130 and {p["Q"] for p in partial["real_size"]["probe"]} >= {32, 16, 8, 4}
    assert partial["real_size"]["end_to_end"] == []


def test_interpolate_is_piecewise_linear_and_clamped():
    points = {4: 1.0, 8: 2.0, 16: 6.0, 32: 10.0}
    assert shapes.interpolate(points, 8) == 2.0
    assert shapes.interpolate(points, 12) == 4.0
    assert shapes.interpolate(points, 6) == 1.5
    assert shapes.interpolate(points, 2) == 1.0 and shapes.interpolate(points, 40) == 10.0


@pytest.mark.slow
def test_the_profile_leaves_the_prefill_out(tmp_path, monkeypatch):
    """--parts profile: one row per mode, and the profiler starts only after every prompt was prefilled."""
    import torch.profiler
    import decoder
    events = []
    admit = decoder.Decoder.admit
    monkeypatch.setattr(decoder.Decoder, "admit", lambda self, *a: (events.append("prefill"), admit(self, *a))[1])
    real_start = torch.profiler.profile.start
    monkeypatch.setattr(torch.profiler.profile, "start", lambda self: (events.append("start"), real_start(self))[1])
    assert bench.main(["--real-size", "--real-size-config", "tiny", "--contexts", "32", "--device", "cpu",
                       "--parts", "profile", "--out", str(tmp_path)]) == 0
    rows = json.loads(next(tmp_path.glob("cpu-real-size-*.json")).read_text())["real_size"]["profile"]
    assert [r["mode"] for r in rows] == ["full", "delayed", "focus-1.5"] and all(r["ms_per_step"] > 0 for r in rows)
    assert events == ["prefill", "prefill", "start"] * 3   # per mode: warm-up, profiled run, then the profiler


@pytest.mark.slow
@pytest.mark.parametrize("whole_queue", [False, True])
def test_serving_warms_up_on_a_batch_or_on_the_whole_queue(tmp_path, monkeypatch, whole_queue):
    """Serving: each mode warms up on one batch's worth of its queue (with --compile; 4 sequences at most
    without), or with --warm-up-queue on the whole queue, then serves the whole queue once, timed."""
    import kernels
    import replay
    # The warm-up rule is under test, not the fusion (test_kernels.py compiles and checks it): plain functions,
    # so the test does not wait half a minute for Inductor.
    monkeypatch.setattr(kernels, "fast_paths", lambda model, on=True: contextlib.nullcontext())
    monkeypatch.setattr(kernels, "fused", lambda fn: fn)
    served = []
    real = replay.replay
    monkeypatch.setattr(replay, "replay", lambda model, queue, *a, **k: (served.append(len(queue)),
                                                                          real(model, queue, *a, **k))[1])
    assert bench.main(["--real-size", "--real-size-config", "tiny", "--contexts", "32", "--device", "cpu",
                       "--parts", "replay", "--replay-problems", "2", "--replay-workload", "arith", "--replay-modes",
                       "full,focus-1.5", "--queue-factor", "4", "--compile", "--out", str(tmp_path)]
                      + ["--warm-up-queue"] * whole_queue) == 0
    queue = 4 * 2                                            # --queue-factor x the tiny shape's batch of 2
    assert served == [queue if whole_queue else 2, queue] * 2
    rows = json.loads(next(tmp_path.glob("cpu-real-size-*.json")).read_text())["real_size"]["replayed"]
    assert all(r["capture_s"] == 0 and r["ms_per_step_without_capture"] == r["ms_per_step"] for r in rows)  # CPU


@pytest.mark.slow
def test_a_failing_serving_mode_keeps_its_traceback_and_the_next_mode_runs(tmp_path, monkeypatch, capsys):
    """A mode that raises leaves a row with its traceback in the results; the modes after it still run, and the
    command exits 1 naming it."""
    import replay
    real = replay.serve

    def serve(model, queue, context, opts):
        if opts.focus:
            raise RuntimeError("a failure of this mode")
        return real(model, queue, context, opts)
    monkeypatch.setattr(replay, "serve", serve)
    assert bench.main(["--real-size", "--real-size-config", "tiny", "--contexts", "32", "--device", "cpu",
                       "--parts", "replay", "--replay-problems", "2", "--replay-workload", "arith", "--replay-modes",
                       "full,focus-1.5,delayed", "--out", str(tmp_path)]) == 1
    rows = json.loads(next(tmp_path.glob("cpu-real-size-*.json")).read_text())["real_size"]["replayed"]
    assert [r["mode"] for r in rows] == ["full", "focus-1.5", "delayed"]
    assert "a failure of this mode" in rows[1]["error"] and "Traceback" in rows[1]["error"]
    assert "error" not in rows[0] and rows[2]["tokens_per_s"] > 0
    err = capsys.readouterr().err
    assert "focus-1.5 concurrency 2 context 32 FAILED" in err and "error: focus-1.5 failed" in err


@pytest.mark.slow
def test_the_timeline_charges_each_call_its_time_and_puts_the_calls_back(tmp_path):
    """--timeline: every served row carries, per step, each timed call's device and host time (on a CPU both the
    host's) and how often it ran: the decoder's plan, choice and end of a step once a step, FOCUS's compaction at
    most once; the time a call spends after a child returned is charged to 'call:child' (the bookkeeping after
    choose: 'step:choose'). Afterwards the calls are the plain ones again."""
    import decoder
    import focus
    import timeline
    plain = [owner.__dict__[name] for owner, name, _ in timeline.CALLS]
    assert bench.main(["--real-size", "--real-size-config", "tiny", "--contexts", "32", "--device", "cpu",
                       "--parts", "replay", "--replay-problems", "2", "--replay-workload", "arith", "--replay-modes",
                       "full,focus-1.5", "--timeline", "--out", str(tmp_path)]) == 0
    rows = json.loads(next(tmp_path.glob("cpu-real-size-*.json")).read_text())["real_size"]["replayed"]
    for row in rows:
        seen = row["timeline"]
        for name in ("plan", "choose", "finish_blocks", "step:choose"):
            assert seen[name]["calls"] == 1.0, name
        assert all(v["device_ms"] == v["host_ms"] >= 0 for v in seen.values())
    assert 0 < rows[1]["timeline"]["compact_step"]["calls"] <= 1 and "compact_step" not in rows[0]["timeline"]
    assert [owner.__dict__[name] for owner, name, _ in timeline.CALLS] == plain
    assert decoder.Decoder.plan is plain[0] and focus.compact_step is plain[7]
