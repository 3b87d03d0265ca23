"""bench.py runs end to end and reports every figure; how fast anything is, is its output, not a test."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

FIGURES = {"pipeline_images_per_s", "pipeline_first_epoch_images_per_s", "pipeline_in_process_images_per_s",
           "pipeline_augmented_images_per_s", "pipeline_device_augmented_images_per_s", "train_images_per_s",
           "end_to_end_images_per_s", "peak_memory_end_to_end_mb", "latency_p50_ms", "latency_p95_ms",
           "batch_inference_images_per_s",
           "peak_memory_pipeline_mb", "peak_memory_training_mb", "peak_memory_inference_mb"}


@pytest.mark.slow
def test_quick_bench_prints_the_table_and_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "bench.py", "--quick", "--json", str(out)], cwd=ROOT, text=True,
                            capture_output=True, timeout=800, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ours/base" in result.stdout and "latency_p50_ms" in result.stdout
    results = json.loads(out.read_text())
    assert FIGURES <= set(results["figures"])
    for name, fig in results["figures"].items():
        assert {"unit", "baseline", "ours", "ratio", "better"} <= set(fig), name
        assert all(math.isfinite(fig[k]) and fig[k] > 0 for k in ("baseline", "ours", "ratio")), name
    assert results["model_only_images_per_s"] > 0  # --quick measures end to end on the CPU too
    assert results["onnx_export_s"] > 0 and results["preprocess_ms"] > 0 and results["first_epoch_s"] > 0
    assert results["predictions_agree"]["same_argmax"] and results["predictions_agree"]["max_abs_prob_diff"] < 1e-4
    assert results["settings"]["device"] in ("cpu", "cuda") and results["settings"]["load_average"]


@pytest.mark.slow
def test_quick_serve_bench_reports_the_served_latency(trained_run, synthetic_dir, tmp_path):
    out = tmp_path / "serve.json"
    # run from an empty folder: nothing may land in the working folder (MLflow's default store would)
    result = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--serve", str(trained_run), "--data",
                             str(synthetic_dir), "--quick", "--json", str(out)], cwd=tmp_path, text=True,
                            capture_output=True, timeout=800, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mlflow models serve, one photo over HTTP" in result.stdout
    figures = json.loads(out.read_text())["serve"]
    for name in ("served_p50_ms", "served_p95_ms", "in_process_p50_ms", "in_process_p95_ms", "startup_s"):
        assert math.isfinite(figures[name]) and figures[name] > 0, name
    assert figures["answered"] == 4 and figures["hands_found"] == 0  # an image-only model looks for none
    assert sorted(p.name for p in tmp_path.iterdir()) == ["serve.json"]  # the store and the server's log went away


def test_quick_live_bench_reads_camera_frames_through_the_live_route_s_function(tmp_path):
    out = tmp_path / "live.json"
    result = subprocess.run([sys.executable, "bench.py", "--live", "--quick", "--json", str(out)], cwd=ROOT, text=True,
                            capture_output=True, timeout=600, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "frames read a second" in result.stdout and "p50" in result.stdout
    results = json.loads(out.read_text())
    assert set(results["live"]) == {"frames_per_s", "latency_p50_ms", "latency_p95_ms"}
    assert all(math.isfinite(v) and v > 0 for v in results["live"].values())
    assert results["settings"]["frames"] == 10 and results["settings"]["frame_size"] == "640x480"


def test_peak_memory_measures_a_block_shorter_than_its_sampling_interval():
    import bench

    with bench.PeakMemory(interval=10.0) as peak:
        pass  # ends long before the sampling thread's first tick
    assert peak.peak_mb > 10  # this process alone holds torch: tens of MB at least


def test_the_pause_before_each_latency_run_is_not_timed():
    import bench

    calls = []
    res = bench.interleaved({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 1}, reps=2,
                            warmup=1, pause=0.2)
    assert calls == ["a", "b", "a", "b", "b", "a"]  # warm-up, then which goes first alternates
    assert all(t < 0.2 for times, _ in res.values() for t in times)


@pytest.mark.timeout(300)
def test_a_crashed_memory_probe_is_a_clear_error_not_a_hang():
    import argparse

    import bench

    # no checkpoint in the setup: the probe process dies with a KeyError before it reports anything
    setup = {"args": argparse.Namespace(device="cpu"), "threads": 1}
    with pytest.raises(RuntimeError, match="memory probe of inference baseline crashed"):
        bench.peak_memory("inference", setup)


def test_gpu_training_steps_are_timed_to_their_end(monkeypatch):
    import argparse

    import torch

    import bench
    import pt_engine

    calls = []

    class Trainer:  # records the order of what the timed step does
        def __init__(self, *args, **kwargs):
            self.model = torch.nn.Identity()

        def run_batch(self, images, targets):
            calls.append("run_batch")

    monkeypatch.setattr(pt_engine, "CustomTrainer", Trainer)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("synchronize"))
    args = argparse.Namespace(arch="efficientnet_lite0", device="cuda")
    batch = (torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))
    for build in bench.training_variants(batch, {}, args, 3, None).values():
        assert build()() == 2
    assert calls == ["run_batch", "synchronize"] * 2
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_a_gpu_is_explained(capsys):
    import bench

    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--device", "cuda"])
    assert exit_info.value.code == 2 and "--device cpu" in capsys.readouterr().err
