"""The fast paths give what the plain paths give: cached images, channels-last training, ONNX predictions.

Speed is measured by bench.py, never asserted here.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data_loader as dl
import image_cache
import hands
import image_io
import predict
import pt_engine
import pt_train
import run_artifacts
from conftest import SHARED_ASL, make_image_folder, requires_shared
from test_pt_engine import make_trainer

B0_CFG = {"resize_size": 256, "crop_size": 224, "interpolation": "bicubic",
          "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def plain_and_cached(samples, cfg, augment: bool, cache_dir: Path, num_workers: int = 0, hflip: bool = False):
    return (dl.ImageDataset(samples, dl.train_transform(cfg, augment, hflip)),
            image_cache.cached_dataset(samples, cfg, augment=augment, cache_dir=cache_dir, num_workers=num_workers,
                                       hflip=hflip))


def assert_same_items(plain, cached, indices) -> None:
    for i in indices:
        torch.manual_seed(i)  # the same random state for both: augmentations must draw the same parameters
        expected, label = plain[i]
        torch.manual_seed(i)
        got, cached_label = cached[i]
        if cached.finish_transform:  # uint8 images, normalised in the loader's process
            assert got.dtype == torch.uint8
            got = cached.finish_transform(got)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert cached_label == label


@pytest.mark.parametrize("augment, hflip", [(False, False), (True, False), (True, True)])
def test_cached_tensors_equal_the_plain_path(synthetic_dir, tmp_path, augment, hflip):
    samples = dl.scan_image_folder(synthetic_dir).samples
    plain, cached = plain_and_cached(samples, B0_CFG, augment, tmp_path, num_workers=2, hflip=hflip)
    assert len(cached) == len(plain)
    assert_same_items(plain, cached, range(0, len(samples), 5))


@requires_shared
@pytest.mark.parametrize("augment", [False, True])
def test_cached_tensors_equal_the_plain_path_on_real_frames(tmp_path, augment):
    samples = [(str(SHARED_ASL / "train" / c / f"{c}{n}.jpg"), k) for k, c in enumerate(("A", "del", "space"))
               for n in (5, 500, 1500)]
    plain, cached = plain_and_cached(samples, B0_CFG, augment, tmp_path)
    assert_same_items(plain, cached, range(len(samples)))


def test_loader_batches_from_workers_equal_the_plain_loader(synthetic_dir, tmp_path):
    samples = dl.scan_image_folder(synthetic_dir).samples
    cfg = dict(B0_CFG, resize_size=48, crop_size=40)
    plain, cached = plain_and_cached(samples, cfg, False, tmp_path)
    batches = [list(dl.make_loader(ds, 8, train=True, num_workers=workers, seed=3))
               for ds, workers in ((plain, 0), (cached, 2))]
    assert isinstance(dl.make_loader(cached, 8, train=True), dl.FinishingLoader)
    for (x, y), (cx, cy) in zip(*batches, strict=True):
        torch.testing.assert_close(cx, x, rtol=0, atol=0)
        assert torch.equal(cy, y)


@pytest.mark.parametrize("augment", [False, True])
def test_a_crop_model_s_cache_holds_the_crops_the_plain_path_reads(synthetic_dir, tmp_path, augment):
    samples = dl.scan_image_folder(synthetic_dir).samples[::4]
    box = (0.2, 0.1, 0.5, 0.6)  # a hand box for every other file; the rest are read whole
    load = hands.CropLoader({path: box for path, _ in samples[::2]})
    plain = dl.ImageDataset(samples, dl.train_transform(B0_CFG, augment), load)
    cached = image_cache.cached_dataset(samples, B0_CFG, augment=augment, cache_dir=tmp_path, load=load)
    assert_same_items(plain, cached, range(len(samples)))
    whole = image_cache.cached_dataset(samples, B0_CFG, augment=augment, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pixels"))) == 2  # the crops never stand in for the whole images
    if augment:  # the source geometry keeps each image's own size: a square where cropped
        assert cached.image(0).size != whole.image(0).size and cached.image(1).size == whole.image(1).size


def test_cache_is_built_once_and_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "data", per_class=3)
    samples = dl.scan_image_folder(root).samples
    image_cache.cached_dataset(samples, B0_CFG, augment=False, cache_dir=tmp_path / "cache")
    built = sorted((tmp_path / "cache").iterdir())
    assert [p.suffix for p in built] == [".npy", ".pixels"] and not list((tmp_path / "cache").glob(".*"))

    def no_build(*args, **kwargs):
        raise AssertionError("the cache was built again")
    monkeypatch.setattr(image_cache, "build_cache", no_build)
    again = image_cache.cached_dataset(samples, B0_CFG, augment=False, cache_dir=tmp_path / "cache")
    assert len(again) == len(samples)
    make_image_folder(root, per_class=3, seed=1)  # same names, new pixels
    with pytest.raises(AssertionError, match="built again"):
        image_cache.cached_dataset(samples, B0_CFG, augment=False, cache_dir=tmp_path / "cache")


def test_images_that_fail_to_decode_are_skipped_and_counted(tmp_path, caplog):
    root = make_image_folder(tmp_path / "data", per_class=4, size=64)
    broken = root / "B" / "B2.jpg"
    broken.write_bytes(broken.read_bytes()[:1000])  # the header survives, so the folder scan keeps it
    samples = dl.scan_image_folder(root).samples
    assert str(broken) in [p for p, _ in samples]
    cached = image_cache.cached_dataset(samples, B0_CFG, augment=False, cache_dir=tmp_path / "cache")
    assert len(cached) == len(samples) - 1 and str(broken) not in [p for p, _ in cached.samples]
    assert "Skipped 1 image(s) that failed to decode" in caplog.text


def test_source_cache_shrinks_only_large_images(tmp_path):
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("A/big.jpg", (600, 400)), ("B/small.jpg", (120, 90))):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / name)
    samples = dl.scan_image_folder(tmp_path).samples
    cached = image_cache.cached_dataset(samples, B0_CFG, augment=True, cache_dir=tmp_path / "cache")
    assert [cached.image(i).size for i in range(2)] == [(384, 256), (120, 90)]  # shorter side capped at 256


def test_cached_dataset_pickles_without_its_pixels(synthetic_dir, tmp_path):
    samples = dl.scan_image_folder(synthetic_dir).samples
    cached = image_cache.cached_dataset(samples, B0_CFG, augment=False, cache_dir=tmp_path)
    cached[0]  # opens the memory map
    clone = pickle.loads(pickle.dumps(cached))  # what a spawned DataLoader worker receives
    assert clone._pixels is None
    torch.testing.assert_close(clone[3][0], cached[3][0], rtol=0, atol=0)


def test_channels_last_training_step_matches_the_plain_one(synthetic_dir, tmp_path):
    trainers = [make_trainer(synthetic_dir, tmp_path / str(i), epochs=1) for i in range(2)]
    fast = pt_engine.CustomTrainer(trainers[1].raw_model, trainers[1].train_loader, trainers[1].val_loaders,
                                   trainers[1].criterion, trainers[1].optimizer, None, tmp_path / "cl", 10, 1,
                                   num_classes=3, channels_last=True)
    images, targets = next(iter(trainers[0].train_loader))
    for trainer in (trainers[0], fast):
        trainer.model.train()
        torch.manual_seed(0)  # the same dropout masks
        trainer.run_batch(images, targets)
    assert fast.raw_model[0].weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(trainers[0].raw_model.state_dict().values(), fast.raw_model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def _history(out: Path) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "time_s"} for h in json.loads((out / "history.json").read_text())]


def test_training_from_the_cache_gives_the_same_history(synthetic_dir, tmp_path):
    # augmentation on: the cached images must go through the same random transforms in the same order
    # --img_size 36 resizes to 41, more than the 40 px images, which the cache therefore stores as they are
    common = ["--xtrain_path", str(synthetic_dir), "--weights", "none", "--img_size", "36", "--batch_size", "8",
              "--num_workers", "0", "--total_epochs", "2", "--no-calibrate", "--no-channels_last"]
    assert pt_train.main([*common, "--save_dir", str(tmp_path / "plain"), "--cache", "none"]) == 0
    assert pt_train.main([*common, "--save_dir", str(tmp_path / "cached"), "--cache", "disk",
                          "--cache_dir", str(tmp_path / "cache")]) == 0
    assert _history(tmp_path / "cached") == _history(tmp_path / "plain")
    assert len(list((tmp_path / "cache").glob("*.pixels"))) == 2  # training (source) and validation (crop)


@pytest.mark.slow
def test_cached_channels_last_ddp_on_cpu_trains(synthetic_dir, tmp_path):
    from test_pt_train import FAST, cli
    out = tmp_path / "ddp"
    result = cli("--xtrain_path", str(synthetic_dir), "--save_dir", str(out), "--total_epochs", "1",
                 "--world_size", "2", "--cache", "disk", "--cache_dir", str(tmp_path / "cache"), "--channels_last",
                 *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(_history(out)) == 1 and result.stderr.count("Decoding") == 2  # built once, before the spawn


@pytest.mark.slow
def test_compiled_training_saves_plain_checkpoints(synthetic_dir, tmp_path):
    trainer = make_trainer(synthetic_dir, tmp_path, epochs=1)
    compiled = pt_engine.CustomTrainer(trainer.raw_model, trainer.train_loader, trainer.val_loaders,
                                       trainer.criterion, trainer.optimizer, None, tmp_path, 10, 1, num_classes=3,
                                       compile_model=True)
    compiled.train()
    assert set(run_artifacts.load_checkpoint(tmp_path / "last.pt")["model"]) == set(trainer.raw_model.state_dict())


def test_cpu_ddp_processes_share_the_cores(monkeypatch):
    monkeypatch.setattr(pt_train.os, "cpu_count", lambda: 8)
    args = pt_train.parse_args(["--num_threads", "3"])
    assert pt_train._num_threads(args, 4) == 3
    args = pt_train.parse_args([])
    assert pt_train._num_threads(args, 1) is None and pt_train._num_threads(args, 4) == 2
    assert args.cache == "none" and args.channels_last  # the defaults on the CPU


@pytest.fixture(scope="module")
def run_copy(trained_run, tmp_path_factory) -> Path:
    """A copy of the shared trained run, since these tests add files to it and touch its checkpoint."""
    copy = tmp_path_factory.mktemp("onnx") / "run"
    shutil.copytree(trained_run, copy)
    return copy


@pytest.fixture(scope="module")
def onnx_and_torch(run_copy):
    return predict.load_predictor(run_copy, backend="onnx"), predict.load_predictor(run_copy)


def test_onnx_predictions_equal_the_torch_ones(onnx_and_torch, run_copy, synthetic_dir):
    fast, plain = onnx_and_torch
    assert isinstance(fast.model, predict.OnnxModule) and (run_copy / "best.onnx").is_file()
    images = [image_io.load_rgb(p) for p, _ in dl.scan_image_folder(synthetic_dir).samples[::4]]
    for batch in (images[:1], images):  # the exported model takes any batch size
        expected, got = plain.predict(batch), fast.predict(batch)
        assert (got - expected).abs().max() < 1e-4
        assert torch.equal(got.argmax(1), expected.argmax(1))
    assert fast.top_k(images[0], 3)[0][0] == plain.top_k(images[0], 3)[0][0]


def test_onnx_export_is_reused_until_the_checkpoint_changes(onnx_and_torch, run_copy, monkeypatch):
    def no_export(*args, **kwargs):
        raise AssertionError("exported again")
    monkeypatch.setattr(predict, "export_onnx", no_export)
    predict.load_predictor(run_copy, backend="onnx")
    os.utime(run_copy / "best.pt")
    with pytest.raises(AssertionError, match="exported again"):
        predict.load_predictor(run_copy, backend="onnx")


def test_onnx_backend_refuses_what_it_cannot_serve(run_copy):
    with pytest.raises(ValueError, match="unknown backend"):
        predict.load_predictor(run_copy, backend="tensorrt")
    with pytest.raises(predict.ModelLoadError, match="CPU"):
        predict.load_predictor(run_copy, device="cuda", backend="onnx")


def test_onnx_threads_do_not_spin_between_reads(onnx_and_torch):
    # the app reads a photo now and then, just after MediaPipe's search, where spinning threads cost it time
    options = onnx_and_torch[0].model.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
