"""gpu_pipeline: the device-side input path, checked on CPU tensors (the same code runs on the GPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

import data_loader
import gpu_pipeline
import image_cache
import image_io
import model as models
from conftest import make_image_folder, requires_cuda

CFG = models.preprocessing("efficientnet_b0", "none", 48)


def cached(root, tmp_path, augment: bool = True) -> image_cache.CachedImageDataset:
    samples = data_loader.scan_image_folder(root).samples
    return image_cache.cached_dataset(samples, CFG, augment=augment, cache_dir=tmp_path / "cache")


def loader(dataset, batch_size: int = 8, augment: bool = True, **kw) -> gpu_pipeline.DeviceLoader:
    return gpu_pipeline.DeviceLoader.from_cache(dataset, CFG, batch_size, augment=augment,
                                                **{"device": torch.device("cpu"), **kw})


def bounds() -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = torch.tensor(CFG["mean"]).view(3, 1, 1), torch.tensor(CFG["std"]).view(3, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


def test_batches_have_the_model_input_shape_and_range(synthetic_dir, tmp_path):
    dataset = cached(synthetic_dir, tmp_path)
    batches = list(loader(dataset))
    assert len(batches) == 36 // 8  # the remainder is dropped
    low, high = bounds()
    for images, labels in batches:
        assert images.shape == (8, 3, 48, 48) and images.dtype == torch.float32
        assert torch.isfinite(images).all()
        assert (images >= low - 1e-4).all() and (images <= high + 1e-4).all()
        assert labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1, 2}


def test_every_image_draws_its_own_augmentation(tmp_path):
    root = make_image_folder(tmp_path / "one", classes=("A", "B"), per_class=1, size=40)
    dataset = cached(root, tmp_path)
    # one image repeated: any two outputs that differ did so by their own random draw
    pixels = gpu_pipeline.cached_pixels(dataset)[:1].expand(16, -1, -1, -1).contiguous()
    aug = gpu_pipeline.DeviceLoader(pixels, torch.zeros(16, dtype=torch.int64), 16,
                                    gpu_pipeline.augmentation(CFG, augment=True), device=torch.device("cpu"))
    images, _ = next(iter(aug))
    flat = images.flatten(1)
    distinct = torch.cdist(flat, flat) + torch.eye(16) * 1e9
    assert distinct.min() > 1e-3


def test_same_seed_and_epoch_give_the_same_batches_and_leave_global_rng_alone(synthetic_dir, tmp_path):
    dataset = cached(synthetic_dir, tmp_path)

    def epoch(n: int, seed: int = 0) -> list[torch.Tensor]:
        batches = loader(dataset, seed=seed)
        batches.sampler.set_epoch(n)
        return [images for images, _ in batches]

    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = epoch(1)
    assert torch.equal(torch.get_rng_state(), before)  # dropout and the model's own draws are not disturbed
    again = epoch(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))  # what a resumed run sees
    assert not torch.equal(first[0], epoch(2)[0]) and not torch.equal(first[0], epoch(1, seed=1)[0])


def test_ranks_get_the_distributed_sampler_shards(synthetic_dir, tmp_path):
    dataset = cached(synthetic_dir, tmp_path)
    labels = torch.tensor([label for _, label in dataset.samples])
    seen = []
    for rank in range(2):
        ranked = loader(dataset, batch_size=6, rank=rank, world_size=2, seed=3)
        ranked.sampler.set_epoch(4)
        expected = DistributedSampler(range(len(dataset)), 2, rank, shuffle=True, seed=3)
        expected.set_epoch(4)
        got = torch.cat([targets for _, targets in ranked])
        assert torch.equal(got, labels[list(expected)])
        seen.append(list(expected))
    assert not set(seen[0]) & set(seen[1])


def test_without_augmentation_the_tensors_equal_the_plain_path(synthetic_dir, tmp_path):
    dataset = cached(synthetic_dir, tmp_path, augment=False)
    batches = loader(dataset, batch_size=36, augment=False)
    batches.sampler.set_epoch(0)
    images, labels = next(iter(batches))
    order = list(batches.sampler)
    plain = data_loader.eval_transform(CFG)
    expected = torch.stack([plain(image_io.load_rgb(dataset.samples[i][0])) for i in order])
    assert torch.allclose(images, expected, atol=1e-5)


def test_augmentation_statistics_match_the_cpu_path(tmp_path):
    # the same images through data_loader.train_transform (PIL, per image) and through the batched path
    root = make_image_folder(tmp_path / "data", classes=("A", "B", "C", "D"), per_class=4, size=60)
    dataset = cached(root, tmp_path)
    pixels = gpu_pipeline.cached_pixels(dataset)
    reps = 48  # 16 images x 48 draws each
    index = torch.arange(len(pixels)).repeat(reps)
    torch.manual_seed(0)
    ours = gpu_pipeline.augmentation(CFG, augment=True)(pixels[index].permute(0, 3, 1, 2).float() / 255)
    transform = data_loader.train_transform(CFG, augment=True)
    images = [Image.fromarray(p.numpy()) for p in pixels]
    theirs = torch.stack([transform(images[i]) for i in index.tolist()])
    assert ours.shape == theirs.shape

    def stats(x: torch.Tensor) -> dict[str, torch.Tensor]:
        means = x.mean((2, 3)).view(reps, len(pixels), 3)  # per draw, image and channel
        return {"mean": x.mean((0, 2, 3)), "std": x.std((0, 2, 3)),
                "contrast": x.std((2, 3)).mean(0),  # spread within an image
                "jitter": (means - means.mean(0)).std((0, 1)),  # how far draws of one image move its colour
                "saturation": (x - x.mean(1, keepdim=True)).abs().mean()}

    ours_stats, theirs_stats = stats(ours), stats(theirs)
    tolerance = {"mean": (0, 0.1), "std": (0.06, 0), "contrast": (0.1, 0), "jitter": (0.15, 0),
                 "saturation": (0.06, 0)}
    for name, (rtol, atol) in tolerance.items():
        a, b = ours_stats[name], theirs_stats[name]
        assert torch.allclose(a, b, rtol=rtol, atol=atol), (name, a, b)
    # erasing and the rotation's corners set whole pixels to exactly 0 (after normalising) at similar rates
    zeros = [float((x == 0).all(1).float().mean()) for x in (ours, theirs)]
    assert abs(zeros[0] - zeros[1]) < 0.03, zeros


def test_images_of_other_sizes_are_resized_to_the_common_one(tmp_path):
    root = make_image_folder(tmp_path / "mixed", per_class=3, size=40)
    Image.new("RGB", (30, 50), (10, 200, 10)).save(root / "A" / "A9.jpg")
    pixels = gpu_pipeline.cached_pixels(cached(root, tmp_path))
    assert pixels.shape == (10, 40, 40, 3) and pixels.dtype == torch.uint8
    assert pixels[:, 20, 20, 1].max() > 150  # the odd image is in, as pixels


def test_uniform_images_are_a_view_of_the_cache_file(synthetic_dir, tmp_path):
    dataset = cached(synthetic_dir, tmp_path)
    pixels = gpu_pipeline.cached_pixels(dataset)
    assert pixels.shape == (36, 40, 40, 3)
    assert np.array_equal(pixels[5].numpy(), np.asarray(dataset.image(5)))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("device", ["cuda:0", "cuda"])  # bench.py names the device without its index
def test_batches_are_made_on_the_gpu_and_reproducible(synthetic_dir, tmp_path, device):
    dataset = cached(synthetic_dir, tmp_path)
    runs = []
    for _ in range(2):
        batches = loader(dataset, device=torch.device(device))
        assert batches.on_device and batches.pixels.is_cuda
        batches.sampler.set_epoch(1)
        runs.append([(images, labels) for images, labels in batches])
    for (a, la), (b, lb) in zip(*runs, strict=True):
        assert a.device.type == "cuda" and la.device.type == "cuda" and a.shape == (8, 3, 48, 48)
        assert torch.equal(a, b) and torch.equal(la, lb)
