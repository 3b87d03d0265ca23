"""bench.py runs end to end and reports every figure; how fast anything is, is its output, not a test."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import bench
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
    with bench.PeakMemory(interval=10.0) as peak:
        pass  # ends long before the sampling thread's first tick
    assert peak.peak_mb > 10  # this process alone holds torch: tens of MB at least


def test_the_pause_before_each_latency_run_is_not_timed():
    calls = []
    res = bench.interleaved({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 1}, reps=2,
                            warmup=1, pause=0.2)
    assert calls == ["a", "b", "a", "b", "b", "a"]  # warm-up, then which goes first alternates
    assert all(t < 0.2 for times, _ in res.values() for t in times)


@pytest.mark.timeout(300)
def test_a_crashed_memory_probe_is_a_clear_error_not_a_hang():
    import argparse

    # no checkpoint in the setup: the probe process dies with a KeyError before it reports anything
    setup = {"args": argparse.Namespace(device="cpu"), "threads": 1}
    with pytest.raises(RuntimeError, match="memory probe of inference baseline crashed"):
        bench.peak_memory("inference", setup)


def test_gpu_training_steps_are_timed_to_their_end(monkeypatch):
    import argparse

    import torch

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
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--device", "cuda"])
    assert exit_info.value.code == 2 and "--device cpu" in capsys.readouterr().err


def clients_results(args: list[str], cwd, tmp_path) -> dict:
    out = tmp_path / "clients.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench.py"), *args, "--clients", "1", "2", "--quick",
                             "--json", str(out)], cwd=cwd, text=True, capture_output=True, timeout=600,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "p50: the median client's; p95: the worst client's" in result.stdout
    return json.loads(out.read_text())


def assert_load_figures(runs: dict, waits: bool) -> None:
    """`waits`: each client sends its next request once the last is answered, so none is ever answered busy."""
    assert list(runs) == ["1", "2"]
    for n, figures in runs.items():
        assert figures["clients"] == len(figures["per_client"]) == int(n)
        assert figures["failed"] == 0 and figures["answered"] > 0, figures
        assert figures["answered"] + figures["busy"] == figures["sent"] and (figures["busy"] == 0 or not waits)
        for name in ("sent_per_s", "answered_per_s", "least_answered_per_s", "median_p50_ms", "worst_p95_ms"):
            assert math.isfinite(figures[name]) and figures[name] > 0, name
        assert figures["sent"] == sum(c["sent"] for c in figures["per_client"])


@pytest.mark.slow
@pytest.mark.skipif(not bench.CHROMIUM.exists(), reason="Debian's chromium is not installed (.ci/run does)")
def test_quick_live_clients_bench_reports_pages_at_once(tmp_path):
    results = clients_results(["--live"], ROOT, tmp_path)
    # a page sends 15 frames/s without waiting: the frames its session is still reading are answered busy
    assert_load_figures(results["live_clients"], waits=False)
    assert all(f["sent"] == 45 * f["clients"] for f in results["live_clients"].values())  # 3 s at 15 frames/s


@pytest.mark.slow
def test_quick_serve_clients_bench_reports_clients_at_once(trained_run, synthetic_dir, tmp_path):
    results = clients_results(["--serve", str(trained_run), "--data", str(synthetic_dir)], tmp_path, tmp_path)
    assert_load_figures(results["serve_clients"], waits=True)


def test_clients_are_pages_or_serving_clients(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--clients", "4"])
    assert exit_info.value.code == 2 and "--live" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--live", "--clients", "0"])
    assert bench.parse_args(["--live", "--clients", "1", "4", "8"]).clients == [1, 4, 8]


def test_load_figures_count_answers_drops_and_failures_per_client():
    def sent(at: float, latency: float, status: int) -> bench.Sent:
        return bench.Sent(0, at, latency, status, None)

    logs = [[sent(0, 0.1, 200), sent(0.5, 0.3, 200), sent(0.6, 0.01, 429), sent(1.0, 1.0, 200)],
            [sent(0, 0.2, 200), sent(1.5, 0.01, 0)]]
    figures = bench.load_figures(logs)
    assert figures["seconds"] == 2.0 and figures["sent"] == 6 and figures["answered"] == 4
    assert figures["busy"] == 1 and figures["failed"] == 1 and figures["busy_share"] == pytest.approx(1 / 6)
    assert figures["answered_per_s"] == 2.0 and figures["least_answered_per_s"] == 0.5
    assert figures["per_client"][0]["p50_ms"] == pytest.approx(300) and figures["median_p50_ms"] == pytest.approx(250)
    assert figures["worst_p95_ms"] == pytest.approx(np.percentile([100, 300, 1000], 95) * 1e3 / 1e3)
