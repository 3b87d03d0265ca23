"""Measure the original pipeline and ours side by side, in one run: `python bench.py [--data DIR]`.

Baseline, the original pipeline: PIL decodes every JPEG every epoch, bicubic resize to 256, centre crop 224,
float32 NCHW batches from a DataLoader with its defaults (no workers), eager PyTorch for training and for the
app's single-image predictions.
Ours: the decoded-image cache (image_cache.py, decode once; uint8 images normalised in the loader's process),
DataLoader workers that persist across epochs (and, as a second figure, no workers), channels-last training
(mixed precision too on a GPU), and ONNX Runtime for inference (predict.py). On a GPU (and with --quick) also
end to end: epochs of training from the image folder, the original pipeline against ours (the decoded images on
the GPU, augmented there: gpu_pipeline.py), beside the model alone on a synthetic batch already on the GPU (the
ceiling any input pipeline can reach). Every clock read on a GPU waits for its queued work first.

Figures: input-pipeline throughput (files to ready training batches, from the second epoch on, and the first
epoch with the cache build), training throughput (forward, backward, step through pt_engine at the training
resolution), single-image latency (p50, p95) and batched throughput of the predictor on the CPU, and peak
memory of each variant. Baseline and ours alternate within every repetition, so that load from other processes
hits both alike; each figure is the median of the timed repetitions after a warm-up. Peak memory is measured
in a fresh process per variant (the PSS of the process and its workers, so shared pages count once; the
peak allocated GPU memory on a GPU). Without --data, JPEGs of the Kaggle frames' size are generated.

`--serve MODEL` measures serving instead: MODEL (a training folder or checkpoint) is logged as the MLflow model
of mlflow_model.py to a temporary store, `mlflow models serve` serves it on loopback, and one photo at a time is
posted to it as JSON (base64) with a pause before each, as for the latency above: the time from sending the
request to reading the answer (p50, p95), decoding and the hand search included, beside the same model answering
in this process (no HTTP, no JSON). Photos from --data (real hand photos: the hand search and both networks are
timed), else the generated ones (no hand in them).

`--live` measures the app's Live mode alone instead: camera frames (640x480 JPEGs, as the page sends them) through
the function its route calls (live.read_frame: decode, find the hand, read the letter, spell), back to back as a
page sends its next frame once the last is answered: frames read a second, and the latency from a frame's
arrival to its answer (p50, p95). Pass the model the app serves (--model): its hand finding is most of the time.

`--clients N [N ...]` measures many at once instead, one run of --seconds (30) per N, on loopback. With --live:
`streamlit run app.py` serves the model, N pages of a headless Chromium (Debian's, driven by playwright) open Live
mode, each a browser session of its own, and this process posts each page's camera frames to its session at the
page's 15 frames/s, without waiting for the last answer (at most LIVE_IN_FLIGHT in flight): a frame that comes
while its session is still reading is answered `busy` and dropped. With --serve: N clients post one photo each
(as above), each as soon as its last is answered. Reported in all and per client: requests sent and answered a
second, busy drops, failures, and the latency of the answered ones (p50 of the median client, p95 of the worst).
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import io
import itertools
import json
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from queue import Empty
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

import data_loader
import gpu_pipeline
import image_cache
import image_io
import model as models
import predict
import pt_engine
import run_artifacts
import terminal
from errors import UsageError
from pt_train import find_free_port

Run = Callable[[], int]  # one timed repetition; returns how many images it handled
Variants = dict[str, Callable[[], Run]]  # name -> builds that variant (models, loaders, caches) and its Run
BASELINE, OURS = "baseline", "ours"
LATENCY_PAUSE_S = 0.1
PROBE_TIMEOUT_S = 1800  # one variant's run in a fresh process; far more than any takes
SERVE_STARTUP_S = 300  # `mlflow models serve` up and answering /ping; it takes seconds to tens of seconds
HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="folder of class sub-folders (default: generated 200x200 JPEGs)")
    p.add_argument("--images", type=int, default=512, help="images per input-pipeline epoch")
    p.add_argument("--arch", choices=models.ARCHS, default="efficientnet_b0")
    p.add_argument("--model", help="a trained run folder or checkpoint for the inference figures (default: "
                                   "random weights of --arch, BatchNorm statistics from the images)")
    p.add_argument("--img_size", type=int, default=None, help="training resolution (default: the weights' own)")
    p.add_argument("--batch_size", type=int, default=32, help="input-pipeline and batched-inference batch")
    p.add_argument("--train_batch_size", type=int, default=16)
    p.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1), help="ours: loader workers")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions of each figure (epochs, steps, batches)")
    p.add_argument("--latency_reps", type=int, default=30, help="timed single-image predictions")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where training runs (inference is measured on the CPU, as the app runs it)")
    p.add_argument("--serve", metavar="MODEL", help="measure `mlflow models serve` of MODEL (a training folder or "
                                                    "checkpoint) answering one photo instead (see above)")
    p.add_argument("--live", action="store_true", help="only the Live-mode figures: camera frames through its "
                                                       "route's function (see above)")
    p.add_argument("--live_frames", type=int, default=300, help="timed frames of --live")
    p.add_argument("--clients", type=int, nargs="+", metavar="N", help="with --live or --serve: N Live pages or "
                                                                       "serving clients at once instead, one run "
                                                                       "per N given (see above)")
    p.add_argument("--seconds", type=float, default=30.0, help="how long each --clients run lasts")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--quick", action="store_true", help="a tiny run that checks the benchmark itself works")
    terminal.add_verbose_arg(p)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA GPU and none is visible; use --device cpu")
    if args.clients and not (args.live or args.serve):
        p.error("--clients measures Live pages (--live) or serving clients (--serve); pass one of them")
    if (args.clients and min(args.clients) < 1) or not args.seconds > 0:
        p.error("--clients takes numbers of 1 or more, --seconds a time above 0")
    if args.quick:
        args.images, args.img_size, args.batch_size, args.train_batch_size = 48, 64, 8, 4
        args.reps, args.latency_reps, args.arch, args.live_frames = 2, 4, "efficientnet_lite0", 10
        args.seconds = 3.0
    return args


# ---------------------------------------------------------------------------------------------- measuring

def synchronize(device: str) -> None:
    """Wait for the GPU to finish what was queued, so that a clock read afterwards times the work itself."""
    if device == "cuda":
        torch.cuda.synchronize()


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def clock() -> float:
    """Seconds, after the GPU has finished what was queued (kernels run asynchronously)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def median_rate(times: list[float], counts: list[int]) -> float:
    return statistics.median(n / t for n, t in zip(counts, times, strict=True))


def interleaved(variants: dict[str, Run], reps: int, warmup: int = 1, pause: float = 0.0
                ) -> dict[str, tuple[list[float], list[int]]]:
    """Run each variant `warmup` times, then `reps` timed times, alternating which goes first; `pause` seconds
    before each timed run, untimed."""
    for _ in range(warmup):
        for run in variants.values():
            run()
    results: dict[str, tuple[list[float], list[int]]] = {name: ([], []) for name in variants}
    for rep in range(reps):
        order = list(variants) if rep % 2 == 0 else list(reversed(variants))
        for name in order:
            time.sleep(pause)
            start = clock()
            count = variants[name]()
            results[name][0].append(clock() - start)
            results[name][1].append(count)
    return results


class PeakMemory:
    """Peak summed PSS (MB) of this process and its children, sampled in a thread while the block runs."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak_mb = interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _record(self) -> None:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except psutil.Error:  # a worker that just exited
                pass
        self.peak_mb = max(self.peak_mb, total / 2**20)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._record()

    def __enter__(self) -> PeakMemory:
        self._record()  # here, not only in the thread: a block shorter than one interval is still measured
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._record()


# ---------------------------------------------------------------------------------------------- the variants

def pipeline_variants(samples: list, cfg: dict, args: argparse.Namespace, cache_dir: Path) -> Variants:
    """One epoch from files to ready batches: the original loader, ours without and with augmentation."""
    def epoch(loader: DataLoader) -> Run:
        return lambda: sum(len(targets) for _, targets in loader)

    def baseline() -> Run:
        dataset = data_loader.ImageDataset(samples, data_loader.eval_transform(cfg))
        return epoch(DataLoader(dataset, args.batch_size, shuffle=True))

    def ours(augment: bool, workers: int) -> Run:
        dataset = image_cache.cached_dataset(samples, cfg, augment=augment, cache_dir=cache_dir,
                                             num_workers=args.num_workers)
        return epoch(data_loader.make_loader(dataset, args.batch_size, train=True, num_workers=workers,
                                             pin_memory=args.device == "cuda"))

    def on_device() -> Run:
        dataset = image_cache.cached_dataset(samples, cfg, augment=True, cache_dir=cache_dir,
                                             num_workers=args.num_workers)
        return epoch(gpu_pipeline.DeviceLoader.from_cache(dataset, cfg, args.batch_size, augment=True,
                                                          device=torch.device(args.device)))

    return {BASELINE: baseline, OURS: lambda: ours(False, args.num_workers),
            "ours_in_process": lambda: ours(False, 0), "ours_augmented": lambda: ours(True, args.num_workers),
            "ours_device_augmented": on_device}


def training_variants(batch: tuple[torch.Tensor, torch.Tensor], cfg: dict, args: argparse.Namespace,
                      num_classes: int, save_dir: Path) -> Variants:
    """One optimisation step through pt_engine: eager float32 NCHW, and ours (channels last; AMP on a GPU)."""
    def step(**options) -> Run:
        torch.manual_seed(0)
        net = models.build_model(args.arch, num_classes, weights="none")
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
        trainer = pt_engine.CustomTrainer(net, [], [], nn.CrossEntropyLoss(), optimizer, gpu, save_dir, 1, 1,
                                          num_classes=num_classes, **options)
        trainer.model.train()

        def run() -> int:
            trainer.run_batch(*batch)
            synchronize(args.device)  # run_batch only queues the GPU's work: time it done, not launched
            return len(batch[1])
        return run

    gpu = 0 if args.device == "cuda" else None
    return {BASELINE: step, OURS: lambda: step(channels_last=True, amp=gpu is not None)}


def end_to_end_variants(samples: list, cfg: dict, args: argparse.Namespace, num_classes: int, cache_dir: Path,
                        save_dir: Path) -> Variants:
    """Training epochs from the image folder through pt_engine: the original pipeline (PIL every epoch, no
    augmentation, DataLoader defaults, float32 NCHW, AdamW) and ours (gpu_pipeline's augmented batches made on
    the device, channels last, bf16 and fused AdamW on a GPU); and the model alone on one synthetic batch already
    on the device, our step with no input pipeline at all: the ceiling."""
    gpu = 0 if args.device == "cuda" else None
    batch = args.train_batch_size

    def trainer(loader, fast: bool) -> pt_engine.CustomTrainer:
        torch.manual_seed(0)
        net = models.build_model(args.arch, num_classes, weights="none")
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=fast and gpu is not None)
        return pt_engine.CustomTrainer(net, loader, [], nn.CrossEntropyLoss(), optimizer, gpu, save_dir, 1, 1,
                                       num_classes=num_classes, channels_last=fast, amp=fast and gpu is not None)

    def baseline() -> Run:
        loader = DataLoader(data_loader.ImageDataset(samples, data_loader.eval_transform(cfg)), batch, shuffle=True)
        original = trainer(loader, fast=False)
        return lambda: (original.run_epoch(0), len(samples))[1]

    def ours() -> Run:
        dataset = image_cache.cached_dataset(samples, cfg, augment=True, cache_dir=cache_dir,
                                             num_workers=args.num_workers)
        loader = gpu_pipeline.DeviceLoader.from_cache(dataset, cfg, batch, augment=True,
                                                      device=torch.device(args.device))
        fast = trainer(loader, fast=True)
        return lambda: (fast.run_epoch(0), len(loader) * batch)[1]

    def model_only() -> Run:
        images = torch.randn(batch, 3, cfg["crop_size"], cfg["crop_size"], device=args.device)
        targets = torch.randint(num_classes, (batch,), device=args.device)
        fast = trainer([], fast=True)
        fast.model.train()
        steps = max(1, len(samples) // batch)

        def run() -> int:
            for _ in range(steps):
                fast.run_batch(images, targets)
            return steps * batch
        return run

    return {BASELINE: baseline, OURS: ours, "model_only": model_only}


def save_checkpoint(path: Path, arch: str, classes: list[str], cfg: dict, images: torch.Tensor) -> None:
    """A checkpoint as pt_train.py writes it: random weights, but BatchNorm statistics of real images.

    With the initial statistics (mean 0, variance 1) B0's activations shrink layer by layer to denormal floats in
    eval mode: every image gets the same output, and denormal arithmetic is slow. Neither is what serves.
    """
    torch.manual_seed(0)
    net = models.build_model(arch, len(classes), weights="none").train()
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # running statistics = the plain average over what it sees
    with torch.no_grad():
        net(images)
    meta = {"arch": arch, "num_classes": len(classes), "classes": classes, "transform": cfg}
    run_artifacts.save_checkpoint({"model": net.state_dict(), "metadata": meta}, path)


def load_predictor(checkpoint: Path, variant: str) -> predict.Predictor:
    """Eager PyTorch for the baseline, ONNX Runtime for ours (exported beside the checkpoint on first use)."""
    return predict.load_predictor(checkpoint, backend="torch" if variant == BASELINE else "onnx")


def latency_run(found: predict.Predictor, image: Image.Image) -> Run:
    """What the app does for one uploaded image: preprocess and predict."""
    return lambda: len(found.predict([image]))


# ---------------------------------------------------------------------------------------------- memory probes

def _probe(phase: str, variant: str, setup: dict, queue) -> None:
    """In a fresh process: build one phase's variants, run `variant` once, report its peak memory."""
    # a spawned process makes spawn its default; loader workers must start as in training (fork on Linux)
    multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)
    if setup["threads"]:
        torch.set_num_threads(setup["threads"])
    args = setup["args"]
    if phase == "pipeline":
        run = pipeline_variants(setup["samples"], setup["cfg"], args, setup["cache_dir"])[variant]()
    elif phase == "training":
        run = training_variants(setup["batch"], setup["cfg"], args, setup["num_classes"], setup["tmp"])[variant]()
    elif phase == "end_to_end":
        run = end_to_end_variants(setup["samples"], setup["cfg"], args, setup["num_classes"], setup["cache_dir"],
                                  setup["tmp"])[variant]()
    else:
        run = latency_run(load_predictor(setup["checkpoint"], variant), setup["image"])
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with PeakMemory() as peak:  # one run allocates all there is: loader workers, gradients, optimizer state
        run()
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None
    queue.put((peak.peak_mb, gpu_mb))


def peak_memory(phase: str, setup: dict) -> dict[str, dict[str, float | None]]:
    """Peak memory of each variant of `phase`, one fresh process each (spawned: nothing of ours inherited)."""
    ctx = multiprocessing.get_context("spawn")
    out = {}
    for variant in (BASELINE, OURS):
        queue = ctx.Queue()
        proc = ctx.Process(target=_probe, args=(phase, variant, setup, queue))
        proc.start()
        try:
            rss, gpu = probe_result(queue, proc, f"{phase} {variant}")
        finally:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        out[variant] = {"rss_mb": rss, "gpu_mb": gpu}
    return out


def probe_result(queue, proc, what: str, timeout: float = PROBE_TIMEOUT_S):
    """What the probe process `proc` puts on `queue`; a RuntimeError, not a hang, when it dies or stalls."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return queue.get(timeout=1)
        except Empty:
            if not proc.is_alive():
                try:  # it may have put its result just before exiting
                    return queue.get(timeout=1)
                except Empty:
                    raise RuntimeError(f"The memory probe of {what} crashed (exit code {proc.exitcode}); its "
                                       "error is printed above.") from None
    raise RuntimeError(f"The memory probe of {what} gave no result within {timeout:.0f} s.")


# ---------------------------------------------------------------------------------------------- data

def generate_images(root: Path, n: int, classes: int = 29, size: int = 200, seed: int = 0) -> Path:
    """`n` JPEGs of the Kaggle frames' size and kind: a smooth scene with a few shapes and sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        folder = root / f"C{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        img = np.stack([rng.uniform(40, 200) + rng.uniform(-60, 60) * (xx * a + yy * (1 - a))
                        for a in rng.uniform(0, 1, 3)], axis=-1)
        for _ in range(4):
            y, x, h, w = rng.integers(0, size - 20, 4)
            img[y:y + h, x:x + w] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 6, img.shape)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"C{i % classes:02d}{i}.jpg", quality=90)
    return root


def pick(samples: list, n: int) -> list:
    """`n` samples spread evenly over the (class-sorted) list, so every class is represented."""
    step = max(1, len(samples) // n)
    return samples[::step][:n]


# ---------------------------------------------------------------------------------------------- serving

@contextlib.contextmanager
def _server(name: str, command: list[str], port: int, cwd: Path, environ: Mapping[str, str], log_path: Path,
            health: str, startup_s: float) -> Iterator[subprocess.Popen]:
    """`command` (the server `name` on loopback `port`) run in `cwd` with `environ`, its output in `log_path`;
    yields its process once `health` (a path) answers, and stops it with its workers (its own process group) on
    exit."""
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, cwd=cwd, env=environ, stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + startup_s
        while not _answers(f"http://127.0.0.1:{port}{health}"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} {'exited' if process.poll() is not None else 'did not answer'} within "
                                   f"{startup_s:.0f} s; its log:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


@contextlib.contextmanager
def served(model_uri: str, folder: Path, environ: Mapping[str, str],
           startup_s: float = SERVE_STARTUP_S) -> Iterator[str]:
    """`mlflow models serve` of `model_uri` in this environment (`--env-manager local`), on a free loopback port,
    run in `folder` with `environ` (its log in `folder/serve.log`); yields its URL once /ping answers, and stops
    it with its workers on exit."""
    port = find_free_port()
    # MLflow starts uvicorn by name: the one beside this interpreter, even where its folder is not on PATH
    env = {**environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), environ.get("PATH", "")])}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local", "-h",
               "127.0.0.1", "-p", str(port)]
    with _server("mlflow models serve", command, port, folder, env, folder / "serve.log", "/ping", startup_s):
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def app_served(model_dir: str | os.PathLike, folder: Path, environ: Mapping[str, str],
               startup_s: float = SERVE_STARTUP_S) -> Iterator[tuple[str, subprocess.Popen]]:
    """`streamlit run app.py` (this repository's) serving `model_dir` on a free loopback port, run with `environ`;
    Teach mode saves into `folder/my_hand` and the model picker lists `folder/runs`, its log is
    `folder/streamlit-PORT.log`. Yields its URL and process once it is healthy; stopped on exit."""
    port = find_free_port()
    env = {**environ, "ASL_MODEL_DIR": str(model_dir), "ASL_COLLECT_DIR": str(folder / "my_hand"),
           "ASL_RUNS_DIR": str(folder / "runs")}
    command = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port",
               str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"]
    with _server("streamlit run app.py", command, port, HERE, env, folder / f"streamlit-{port}.log",
                 "/_stcore/health", startup_s) as process:
        yield f"http://127.0.0.1:{port}", process


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def request_body(photos: list[bytes]) -> bytes:
    """The JSON that asks the served model about these photos (files' bytes), one row each."""
    import mlflow_model

    rows = [[base64.b64encode(photo).decode("ascii")] for photo in photos]
    return json.dumps({"dataframe_split": {"columns": [mlflow_model.IMAGE_COLUMN], "data": rows}}).encode()


def invoke(url: str, body: bytes, timeout: float = 120) -> tuple[int, dict]:
    """POST `body` (JSON) to the served model's /invocations: the HTTP status and the JSON answer, an error's too."""
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def serve_photos(args: argparse.Namespace, tmp: Path) -> tuple[Path, list[bytes]]:
    """The folder of --serve's photos (--data, else generated ones) and `--latency_reps` of its files' bytes."""
    root = Path(args.data) if args.data else generate_images(tmp / "images", args.latency_reps)
    return root, [Path(path).read_bytes() for path, _ in pick(data_loader.scan_image_folder(root).samples,
                                                              args.latency_reps)]


def logged_model(source: str, tmp: Path) -> tuple[str, str]:
    """`source` (a training folder or checkpoint) logged as the MLflow model to a store in `tmp`: its URI and the
    store's."""
    import mlflow

    import log_experiment

    store = f"sqlite:///{tmp}/mlflow.db"
    mlflow.set_tracking_uri(store)
    # its artifacts in the temporary folder too: MLflow's default is ./mlruns in the working folder
    experiment = mlflow.create_experiment("bench-serve", artifact_location=(tmp / "artifacts").as_uri())
    progress(f"logging {source} as an MLflow model")
    with mlflow.start_run(experiment_id=experiment) as run:
        log_experiment.log_model(source)
    return f"runs:/{run.info.run_id}/model", store


def measure_serve(args: argparse.Namespace, tmp: Path) -> dict:
    """One photo answered by `mlflow models serve` of --serve, and by the same model in this process."""
    import mlflow
    import pandas as pd

    import mlflow_model

    root, photos = serve_photos(args, tmp)
    uri, store = logged_model(args.serve, tmp)
    in_process = mlflow.pyfunc.load_model(uri)
    progress(f"serving {uri} (mlflow models serve), then {len(photos)} photos from {root}")
    start = time.perf_counter()
    with served(uri, tmp, {**os.environ, "MLFLOW_TRACKING_URI": store}) as url:
        startup_s = time.perf_counter() - start
        bodies = itertools.cycle([request_body([photo]) for photo in photos])
        frames = itertools.cycle([pd.DataFrame({mlflow_model.IMAGE_COLUMN: [photo]}) for photo in photos])
        answers: list[dict] = []

        def over_http() -> int:
            status, answer = invoke(url, next(bodies))
            if status != 200:
                raise RuntimeError(f"the served model answered HTTP {status}: {answer}")
            answers.extend(answer["predictions"])
            return 1

        res = interleaved({"served": over_http, "in_process": lambda: len(in_process.predict(next(frames)))},
                          args.latency_reps, warmup=2, pause=LATENCY_PAUSE_S)
    timed = answers[-args.latency_reps:]
    return {
        "settings": {"serve": str(args.serve), "data": str(root), "photos": len(photos), "requests": args.latency_reps,
                     "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                     "cpu_count": os.cpu_count(), "load_average": os.getloadavg()},
        "serve": {**{f"{name}_{q_name}_ms": float(np.percentile(res[name][0], q)) * 1e3
                     for name in ("served", "in_process") for q, q_name in ((50, "p50"), (95, "p95"))},
                  "startup_s": startup_s,
                  "hands_found": sum(bool(a["hand_found"]) for a in timed), "answered": len(timed)},
    }


def serve_table(results: dict) -> str:
    figures = results["serve"]
    return "\n".join([
        f"mlflow models serve, one photo over HTTP on loopback: p50 {figures['served_p50_ms']:.1f} ms, "
        f"p95 {figures['served_p95_ms']:.1f} ms",
        f"the same model in this process (no HTTP): p50 {figures['in_process_p50_ms']:.1f} ms, "
        f"p95 {figures['in_process_p95_ms']:.1f} ms",
        f"a hand found in {figures['hands_found']} of {figures['answered']} timed photos; server up in "
        f"{figures['startup_s']:.1f} s"])


# ---------------------------------------------------------------------------------------------- report

def figure(unit: str, baseline: float, ours: float, better: str) -> dict:
    return {"unit": unit, "baseline": baseline, "ours": ours, "ratio": ours / baseline, "better": better}


def measure(args: argparse.Namespace, tmp: Path) -> dict:
    root = Path(args.data) if args.data else generate_images(tmp / "images", args.images)
    images = data_loader.scan_image_folder(root)
    samples = pick(images.samples, args.images)
    cfg = models.preprocessing(args.arch, "none", args.img_size)
    cache_dir = tmp / "cache"
    figures: dict[str, dict] = {}

    progress(f"input pipeline: {len(samples)} images from {root}")
    # input pipeline: our first epoch includes the cache build; the baseline's first warms the OS file cache
    factories = pipeline_variants(samples, cfg, args, cache_dir)
    pipe = {BASELINE: factories[BASELINE]()}
    pipe[BASELINE]()
    start = time.perf_counter()
    pipe[OURS] = factories[OURS]()
    first = pipe[OURS]()
    first_s = time.perf_counter() - start
    pipe.update({name: factories[name]() for name in ("ours_in_process", "ours_augmented", "ours_device_augmented")})
    res = interleaved(pipe, args.reps, warmup=0)
    base = median_rate(*res[BASELINE])
    figures["pipeline_images_per_s"] = figure("images/s, epoch 2+", base, median_rate(*res[OURS]), "higher")
    figures["pipeline_first_epoch_images_per_s"] = figure("images/s, epoch 1 incl. decode", base, first / first_s,
                                                          "higher")
    figures["pipeline_in_process_images_per_s"] = figure("images/s, ours without workers", base,
                                                         median_rate(*res["ours_in_process"]), "higher")
    figures["pipeline_augmented_images_per_s"] = figure("images/s, ours with augmentation", base,
                                                        median_rate(*res["ours_augmented"]), "higher")
    figures["pipeline_device_augmented_images_per_s"] = figure(
        f"images/s, ours augmented on the {args.device}", base, median_rate(*res["ours_device_augmented"]), "higher")
    del pipe  # ends our loader workers

    progress(f"training {args.arch} at {cfg['crop_size']} px, batch {args.train_batch_size}")
    # training: one fixed batch of real images, so only forward, backward and step are timed
    batch = next(iter(DataLoader(data_loader.ImageDataset(samples, data_loader.eval_transform(cfg)),
                                 args.train_batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))))
    runs = {name: build() for name, build in training_variants(batch, cfg, args, len(images.classes), tmp).items()}
    res = interleaved(runs, args.reps)
    del runs
    figures["train_images_per_s"] = figure("images/s", median_rate(*res[BASELINE]), median_rate(*res[OURS]),
                                           "higher")
    ceiling = None
    end_to_end = args.device == "cuda" or args.quick  # on a CPU the training figure above tells the same story
    if end_to_end:
        progress(f"end to end: training epochs of {len(samples)} images, batch {args.train_batch_size}")
        runs = {name: build() for name, build in
                end_to_end_variants(samples, cfg, args, len(images.classes), cache_dir, tmp).items()}
        res = interleaved(runs, args.reps)
        del runs
        figures["end_to_end_images_per_s"] = figure("images/s, training epochs from files", median_rate(*res[BASELINE]),
                                                    median_rate(*res[OURS]), "higher")
        ceiling = median_rate(*res["model_only"])

    progress("inference on the CPU (exporting the ONNX model first)")
    # inference on the CPU, as the app does it; ours exports the ONNX model once (timed on its own)
    checkpoint = tmp / "model.pt"
    if args.model:  # a copy: ours exports the ONNX model beside the checkpoint
        shutil.copy(predict.checkpoint_path(args.model), checkpoint)
    else:
        save_checkpoint(checkpoint, args.arch, images.classes, cfg, batch[0])
    found = {BASELINE: load_predictor(checkpoint, BASELINE)}
    start = time.perf_counter()
    found[OURS] = load_predictor(checkpoint, OURS)
    export_s = time.perf_counter() - start
    image = image_io.load_rgb(samples[0][0])
    # a pause before each, as the app reads a photo now and then: back to back, the threads one variant leaves
    # spinning would be timed in the other's figure
    res = interleaved({v: latency_run(p, image) for v, p in found.items()}, args.latency_reps, warmup=2,
                      pause=LATENCY_PAUSE_S)
    for q, name in ((50, "p50"), (95, "p95")):
        base, ours = (float(np.percentile(res[v][0], q)) * 1e3 for v in (BASELINE, OURS))
        figures[f"latency_{name}_ms"] = figure("ms, one image", base, ours, "lower")
    # both variants share the preprocessing code: timed once, to show its share of the latency
    pre = interleaved({"preprocess": lambda: len(found[OURS].preprocess(image))}, args.latency_reps)
    preprocess_ms = statistics.median(pre["preprocess"][0]) * 1e3
    # a hand-aware model (pt_train.py --hands crop or fused) finds the hand in every image: part of both latencies
    hand_ms = (statistics.median(interleaved({"hands": lambda: len(found[OURS].find_hands([image]))},
                                             args.latency_reps)["hands"][0]) * 1e3
               if found[OURS].uses_hands else None)
    inputs = torch.stack([found[OURS].preprocess(image_io.load_rgb(p)) for p, _ in samples[:args.batch_size]])
    res = interleaved({v: (lambda p=p: len(p.predict_batch(inputs))) for v, p in found.items()}, args.reps)
    figures["batch_inference_images_per_s"] = figure(f"images/s, batch {len(inputs)}", median_rate(*res[BASELINE]),
                                                     median_rate(*res[OURS]), "higher")
    probs = {v: p.predict_batch(inputs) for v, p in found.items()}

    setup = {"args": args, "threads": args.threads, "samples": samples, "cfg": cfg, "cache_dir": cache_dir,
             "batch": batch, "num_classes": len(images.classes), "tmp": tmp, "checkpoint": checkpoint,
             "image": image}
    progress("peak memory, one fresh process per variant")
    memory = {phase: peak_memory(phase, setup)
              for phase in ("pipeline", "training", *(["end_to_end"] if end_to_end else []), "inference")}
    for phase, found_mb in memory.items():
        figures[f"peak_memory_{phase}_mb"] = figure("MB (PSS incl. workers)", found_mb[BASELINE]["rss_mb"],
                                                    found_mb[OURS]["rss_mb"], "lower")
        if args.device == "cuda" and phase != "inference":
            figures[f"peak_gpu_memory_{phase}_mb"] = figure("MB allocated", found_mb[BASELINE]["gpu_mb"],
                                                            found_mb[OURS]["gpu_mb"], "lower")
    return {
        "settings": {**{k: v for k, v in vars(args).items() if k != "json"}, "data": str(root),
                     "num_classes": len(images.classes), "crop_size": cfg["crop_size"],
                     "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                     "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "torch": torch.__version__,
                     "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None},
        "figures": figures,
        "onnx_export_s": export_s,
        "preprocess_ms": preprocess_ms,
        "hand_finding_ms": hand_ms,
        "first_epoch_s": first_s,
        "model_only_images_per_s": ceiling,
        "predictions_agree": {"max_abs_prob_diff": float((probs[BASELINE] - probs[OURS]).abs().max()),
                              "same_argmax": bool(torch.equal(probs[BASELINE].argmax(1), probs[OURS].argmax(1)))},
    }


LIVE_FRAME_SIZE = (640, 480)  # a webcam's frame, at live.MAX_SIDE


def camera_frames(samples: list, n: int, quality: float) -> list[bytes]:
    """`n` of the images as a Live page sends camera frames: at LIVE_FRAME_SIZE, JPEG at `quality` (0..1)."""
    frames = []
    for path, _ in pick(samples, n):
        buf = io.BytesIO()
        image_io.load_rgb(path).resize(LIVE_FRAME_SIZE).save(buf, "JPEG", quality=round(quality * 100))
        frames.append(buf.getvalue())
    return frames


def live_model(args: argparse.Namespace, tmp: Path) -> tuple[Path, data_loader.ImageList, Path]:
    """--live's images (--data, else generated ones) and its model: a copy of --model, else random weights of
    --arch with BatchNorm statistics of the images, as a checkpoint in `tmp`."""
    root = Path(args.data) if args.data else generate_images(tmp / "images", 64)
    images = data_loader.scan_image_folder(root)
    checkpoint = tmp / "model.pt"
    if args.model:  # a copy: the ONNX model is exported beside the checkpoint
        shutil.copy(predict.checkpoint_path(args.model), checkpoint)
    else:
        cfg = models.preprocessing(args.arch, "none", args.img_size)
        transform = data_loader.eval_transform(cfg)
        batch = torch.stack([transform(image_io.load_rgb(p)) for p, _ in pick(images.samples, 16)])
        save_checkpoint(checkpoint, args.arch, images.classes, cfg, batch)
    return root, images, checkpoint


def measure_live(args: argparse.Namespace, tmp: Path) -> dict:
    """Live mode's path: camera frames through `live.read_frame` (what its route runs for each frame), one after another; see the module docstring."""
    import live  # here, not at the top: only --live needs Streamlit

    root, images, checkpoint = live_model(args, tmp)
    predictor = predict.load_predictor(checkpoint, backend="onnx")  # as the app serves on the CPU
    frames = camera_frames(images.samples, min(30, len(images.samples)), live.JPEG_QUALITY)
    session = live.LiveSession(predictor, live.Settings())
    progress(f"live: {args.live_frames} camera frames ({len(frames)} distinct) through the Live route's function")

    def read(data: bytes) -> float:
        arrived = time.perf_counter()
        live.read_frame(session, data, time.monotonic())
        return time.perf_counter() - arrived

    for data in frames[:3]:  # warm-up: ONNX Runtime's and MediaPipe's first runs
        read(data)
    start = time.perf_counter()
    latencies = [read(frames[i % len(frames)]) for i in range(args.live_frames)]
    total = time.perf_counter() - start
    return {"settings": {"model": args.model or f"random {args.arch}", "data": str(root),
                         "hand_aware": predictor.uses_hands, "frames": args.live_frames,
                         "frame_size": "x".join(map(str, LIVE_FRAME_SIZE)),
                         "frame_kb": statistics.mean(map(len, frames)) / 1024, "torch_threads": torch.get_num_threads(),
                         "cpu_count": os.cpu_count(), "load_average": os.getloadavg()},
            "live": {"frames_per_s": args.live_frames / total,
                     "latency_p50_ms": float(np.percentile(latencies, 50)) * 1e3,
                     "latency_p95_ms": float(np.percentile(latencies, 95)) * 1e3}}


def live_table(results: dict) -> str:
    figures, settings = results["live"], results["settings"]
    return "\n".join([
        f"Live mode: {settings['frames']} camera frames of {settings['frame_size']} "
        f"({settings['frame_kb']:.0f} KB JPEG), {'hand-aware' if settings['hand_aware'] else 'image-only'} model",
        f"frames read a second, end to end (JPEG in, letter out): {figures['frames_per_s']:.1f}",
        f"latency from a frame's arrival to its answer: p50 {figures['latency_p50_ms']:.1f} ms, "
        f"p95 {figures['latency_p95_ms']:.1f} ms"])


# ---------------------------------------------------------------------------------------------- many at once

# Debian's chromium (playwright drives it directly: no browser download) and the flags this machine needs: no
# sandbox as root, and no background traffic to hosts the network refuses
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PAGE_TIMEOUT_MS = 120_000  # a page's first run loads the model: on a busy two-core machine, tens of seconds
# A simulated Live page sends its camera's frame every 1/fps s without waiting for the last answer, so at most
# this many of its frames are in flight: what its session is still reading answers the others `busy`
LIVE_IN_FLIGHT = 3
REQUEST_TIMEOUT_S = 60.0  # one answer under load; far more than any takes
MAX_REQUESTS_PER_S = 100  # a serving client's bound on requests, so that a run ends by count as well as by time


@dataclass(frozen=True)
class Sent:
    """One request of a load run: which of its client's bodies it carried (`index`), when it went out (seconds from
    the run's start), how long its answer took, the HTTP status (0: none came, the connection failed or timed out)
    and the JSON answer (None where it was not JSON)."""
    index: int
    sent: float
    latency: float
    status: int
    answer: dict | None


@contextlib.contextmanager
def live_pages(url: str, n: int, hold_frames: int | None = None) -> Iterator[list[str]]:
    """`n` browser sessions of the app at `url` in Live mode: pages of a headless Chromium without a camera (so
    they send no frames of their own), holding a letter for `hold_frames` frames where given (the sidebar's
    setting) and else the default. Yields their session tokens, each read from the request its page's Clear
    button makes, and keeps the pages open until the block ends."""
    if not CHROMIUM.exists():
        raise UsageError(f"Live pages at once need Debian's chromium at {CHROMIUM} (apt-get install chromium).")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        raise UsageError("Live pages at once need playwright: pip install -r requirements-dev.txt") from None

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        try:
            pages = [browser.new_page() for _ in range(n)]
            for page in pages:  # all load at once; each is then set up in turn
                page.goto(url, wait_until="commit")
            yield [_live_token(page, hold_frames, expect) for page in pages]
        finally:
            browser.close()


def _live_token(page, hold_frames: int | None, expect) -> str:
    """Switch a page of the app to Live mode (and a hold of `hold_frames` frames) as a user does; its token."""
    page.get_by_role("radio", name="Live").click(timeout=PAGE_TIMEOUT_MS)
    caption = "Hold each letter for"
    if hold_frames is not None:
        page.get_by_role("radio", name="frames", exact=True).click(timeout=PAGE_TIMEOUT_MS)
        page.get_by_role("slider", name="Frames").focus(timeout=PAGE_TIMEOUT_MS)
        page.keyboard.press("Home")
        for _ in range(hold_frames - 1):
            page.keyboard.press("ArrowRight")
        caption = f"Hold each letter for {hold_frames} frame{'' if hold_frames == 1 else 's'} to type it"
    # written after the script run has opened the session with these settings
    expect(page.get_by_text(caption)).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    with page.expect_request(lambda request: request.url.endswith("/clear"), timeout=PAGE_TIMEOUT_MS) as clear:
        page.get_by_role("button", name="Clear").click(timeout=PAGE_TIMEOUT_MS)
    return clear.value.url.split("/")[-2]


def _post(client, url: str, body: bytes, index: int, start: float, content_type: str) -> Sent:
    import httpx

    sent = time.monotonic()
    try:
        response = client.post(url, content=body, headers={"Content-Type": content_type})
    except httpx.HTTPError:
        return Sent(index, sent - start, time.monotonic() - sent, 0, None)
    latency = time.monotonic() - sent
    try:
        answer = response.json()
    except ValueError:
        answer = None
    return Sent(index, sent - start, latency, response.status_code, answer)


def _live_page(url: str, token: str, frames: Sequence[bytes], start: float, fps: float, ticks: int) -> list[Sent]:
    """One simulated page: its camera's frame `i % len(frames)` sent at `start + i / fps` for `ticks` ticks, at
    most LIVE_IN_FLIGHT in flight (see there); its answers in the order they came."""
    import httpx

    frame_url = f"{url}/api/live/{token}/frame"
    limits = httpx.Limits(max_connections=LIVE_IN_FLIGHT)
    with (httpx.Client(timeout=REQUEST_TIMEOUT_S, limits=limits) as client,
          ThreadPoolExecutor(LIVE_IN_FLIGHT) as pool):
        futures = []
        for i in range(ticks):
            time.sleep(max(0.0, start + i / fps - time.monotonic()))
            futures.append(pool.submit(_post, client, frame_url, frames[i % len(frames)], i % len(frames), start,
                                       "image/jpeg"))
        return sorted((future.result() for future in futures), key=lambda s: s.sent + s.latency)


def live_load(url: str, pages: Sequence[tuple[str, Sequence[bytes]]], fps: float, seconds: float,
              start: float | None = None) -> list[list[Sent]]:
    """Live pages at once against the app at `url`: each (token, its camera's frames) sends `fps` frames a second
    for `seconds` (see `_live_page`), all starting together at `start` (time.monotonic(); by default in 0.5 s, so
    that every page's thread has started before the first tick); each page's answers in the order they came, their
    times counted from `start`."""
    start = time.monotonic() + 0.5 if start is None else start
    ticks = round(seconds * fps)
    with ThreadPoolExecutor(len(pages)) as pool:
        futures = [pool.submit(_live_page, url, token, frames, start, fps, ticks) for token, frames in pages]
        return [future.result() for future in futures]


def _serve_client(url: str, bodies: Sequence[bytes], first: int, start: float, seconds: float) -> list[Sent]:
    """One serving client: `bodies` in turn from `first`, each sent once the last is answered, until `seconds`
    after `start`."""
    import httpx

    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
        time.sleep(max(0.0, start - time.monotonic()))
        answers = []
        for i in range(round(seconds * MAX_REQUESTS_PER_S)):
            if time.monotonic() >= start + seconds:
                break
            index = (first + i) % len(bodies)
            answers.append(_post(client, f"{url}/invocations", bodies[index], index, start, "application/json"))
        return answers


def serve_load(url: str, clients: Sequence[Sequence[bytes]], seconds: float) -> list[list[Sent]]:
    """Clients at once against `mlflow models serve` at `url`: client k posts its bodies (JSON) in turn from its
    k-th, each once the last is answered, for `seconds`; each client's answers in order."""
    start = time.monotonic() + 0.5
    with ThreadPoolExecutor(len(clients)) as pool:
        futures = [pool.submit(_serve_client, url, bodies, k, start, seconds) for k, bodies in enumerate(clients)]
        return [future.result() for future in futures]


def load_figures(logs: list[list[Sent]]) -> dict:
    """What a load run served, in all and per client: requests sent and answered (HTTP 200) a second, `busy`
    answers (429), failures (any other answer, or none), and the latency of the answered requests (p50, p95)."""
    elapsed = max(s.sent + s.latency for log in logs for s in log)
    per_client = []
    for log in logs:
        answered = [s.latency for s in log if s.status == 200]
        per_client.append({
            "sent": len(log), "answered": len(answered), "answered_per_s": len(answered) / elapsed,
            "busy": sum(s.status == 429 for s in log), "failed": sum(s.status not in (200, 429) for s in log),
            "p50_ms": float(np.percentile(answered, 50)) * 1e3 if answered else None,
            "p95_ms": float(np.percentile(answered, 95)) * 1e3 if answered else None})
    total = {key: sum(c[key] for c in per_client) for key in ("sent", "answered", "busy", "failed")}
    latencies = [c["p50_ms"] for c in per_client if c["p50_ms"] is not None]
    return {"clients": len(logs), "seconds": elapsed, **total, "sent_per_s": total["sent"] / elapsed,
            "answered_per_s": total["answered"] / elapsed, "busy_share": total["busy"] / max(1, total["sent"]),
            "least_answered_per_s": min(c["answered_per_s"] for c in per_client),
            "median_p50_ms": statistics.median(latencies) if latencies else None,
            "worst_p95_ms": max((c["p95_ms"] for c in per_client if c["p95_ms"] is not None), default=None),
            "per_client": per_client}


def _rotated(items: Sequence, by: int) -> list:
    by %= len(items)
    return [*items[by:], *items[:by]]


def measure_live_clients(args: argparse.Namespace, tmp: Path) -> dict:
    """Live pages at once (--clients) against `streamlit run app.py` serving --live's model: each page a browser
    session of its own, its frames posted by this process at the page's rate (live.PAGE_FPS) for --seconds."""
    import live

    root, images, checkpoint = live_model(args, tmp)
    frames = camera_frames(images.samples, min(30, len(images.samples)), live.JPEG_QUALITY)
    runs = {}
    with app_served(checkpoint, tmp, os.environ) as (url, _), live_pages(url, max(args.clients)) as tokens:
        pages = [(token, _rotated(frames, 7 * k)) for k, token in enumerate(tokens)]
        progress(f"live: {len(tokens)} pages open; a warm-up, then {', '.join(map(str, args.clients))} at once")
        live_load(url, pages, live.PAGE_FPS, min(3.0, args.seconds))  # ONNX Runtime's and MediaPipe's first runs
        for n in args.clients:
            progress(f"live: {n} page{'s' * (n != 1)} at {live.PAGE_FPS} frames/s for {args.seconds:g} s")
            runs[str(n)] = load_figures(live_load(url, pages[:n], live.PAGE_FPS, args.seconds))
    return {"settings": {"model": args.model or f"random {args.arch}", "data": str(root), "fps": live.PAGE_FPS,
                         "in_flight": LIVE_IN_FLIGHT, "seconds": args.seconds,
                         "frame_size": "x".join(map(str, LIVE_FRAME_SIZE)),
                         "frame_kb": statistics.mean(map(len, frames)) / 1024, "cpu_count": os.cpu_count(),
                         "load_average": os.getloadavg()},
            "live_clients": runs}


def measure_serve_clients(args: argparse.Namespace, tmp: Path) -> dict:
    """Serving clients at once (--clients) against `mlflow models serve` of --serve: each posts a photo as soon as
    the last is answered, for --seconds."""
    root, photos = serve_photos(args, tmp)
    uri, store = logged_model(args.serve, tmp)
    bodies = [request_body([photo]) for photo in photos]
    runs = {}
    with served(uri, tmp, {**os.environ, "MLFLOW_TRACKING_URI": store}) as url:
        progress(f"serving {uri}: a warm-up, then {', '.join(map(str, args.clients))} clients at once")
        serve_load(url, [bodies], min(3.0, args.seconds))
        for n in args.clients:
            progress(f"serving: {n} client{'s' * (n != 1)} for {args.seconds:g} s")
            runs[str(n)] = load_figures(serve_load(url, [bodies] * n, args.seconds))
    return {"settings": {"serve": str(args.serve), "data": str(root), "photos": len(photos),
                         "seconds": args.seconds, "cpu_count": os.cpu_count(), "load_average": os.getloadavg()},
            "serve_clients": runs}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def clients_table(results: dict) -> str:
    settings = results["settings"]
    if "live_clients" in results:
        runs = results["live_clients"]
        lines = [f"Live pages at once against streamlit run app.py ({settings['model']}): each sends "
                 f"{settings['fps']} frames/s of {settings['frame_size']} for {settings['seconds']:g} s, at most "
                 f"{settings['in_flight']} in flight",
                 f"{'pages':>5s} {'sent/s':>7s} {'read/s':>7s} {'least/page':>10s} {'busy':>6s} {'p50 ms':>7s} "
                 f"{'p95 ms':>7s} {'failed':>6s}"]
    else:
        runs = results["serve_clients"]
        lines = [f"mlflow models serve of {settings['serve']}, clients at once for {settings['seconds']:g} s, each "
                 "posting a photo once the last is answered",
                 f"{'clients':>7s} {'answers/s':>9s} {'least/client':>12s} {'p50 ms':>7s} {'p95 ms':>7s} "
                 f"{'failed':>6s}"]
    for n, f in runs.items():
        if "live_clients" in results:
            lines.append(f"{n:>5s} {f['sent_per_s']:7.1f} {f['answered_per_s']:7.1f} {f['least_answered_per_s']:10.1f}"
                         f" {f['busy_share']:6.0%} {_ms(f['median_p50_ms']):>7s} {_ms(f['worst_p95_ms']):>7s} "
                         f"{f['failed']:6d}")
        else:
            lines.append(f"{n:>7s} {f['answered_per_s']:9.1f} {f['least_answered_per_s']:12.1f} "
                         f"{_ms(f['median_p50_ms']):>7s} {_ms(f['worst_p95_ms']):>7s} {f['failed']:6d}")
    lines.append("p50: the median client's; p95: the worst client's; read/answers: HTTP 200, busy: 429")
    return "\n".join(lines)


def table(results: dict) -> str:
    lines = [f"{'figure':36s} {'unit':34s} {'baseline':>10s} {'ours':>10s} {'ours/base':>10s}"]
    for name, f in results["figures"].items():
        lines.append(f"{name:36s} {f['unit']:34s} {f['baseline']:10.1f} {f['ours']:10.1f} {f['ratio']:9.2f}x"
                     f"  ({f['better']} is better)")
    agree = results["predictions_agree"]
    lines += [f"preprocessing of one image (PIL resize, crop, normalise; shared): {results['preprocess_ms']:.1f} ms",
              *([f"hand finding in one image (MediaPipe; shared, included in the latencies): "
                 f"{results['hand_finding_ms']:.1f} ms"] if results.get("hand_finding_ms") is not None else []),
              f"ONNX export (once per checkpoint): {results['onnx_export_s']:.1f} s",
              f"our first epoch, cache build included: {results['first_epoch_s']:.1f} s",
              *([f"the model alone on a synthetic batch on the device (the ceiling): "
                 f"{results['model_only_images_per_s']:.1f} images/s"] if results["model_only_images_per_s"] else []),
              f"predictions agree: max |dp| {agree['max_abs_prob_diff']:.2e}, same argmax {agree['same_argmax']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    terminal.configure(args.verbose)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True  # as pt_train.py trains on a GPU; no effect on the CPU
    if args.clients:
        run, report = (measure_serve_clients if args.serve else measure_live_clients), clients_table
    else:
        run = measure_serve if args.serve else measure_live if args.live else measure
        report = serve_table if args.serve else live_table if args.live else table
    try:
        with tempfile.TemporaryDirectory(prefix="asl-bench-") as tmp:
            results = run(args, Path(tmp))
    except UsageError as err:
        print(f"bench.py: {err}", file=sys.stderr)
        return 2
    print(report(results))
    print(json.dumps(results, indent=2))
    if args.json:
        run_artifacts.save_json(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
