"""data_loader: dataset discovery, skipping bad files, the honest split, transforms and loaders."""
from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import EfficientNet_B0_Weights

import data_loader as dl
import hands
import image_io
from conftest import SHARED_ASL, make_image_folder, requires_shared

B0_CFG = {"resize_size": 256, "crop_size": 224, "interpolation": "bicubic",
          "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def test_scan_lists_classes_and_samples(synthetic_dir):
    images = dl.scan_image_folder(synthetic_dir)
    assert images.classes == ["A", "B", "C"]
    assert Counter(label for _, label in images.samples) == {0: 12, 1: 12, 2: 12}
    assert images.skipped == []


def test_kaggle_download_root_is_resolved(tmp_path):
    nested = make_image_folder(tmp_path / "asl_alphabet_train" / "asl_alphabet_train", per_class=2)
    assert dl.resolve_train_dir(tmp_path) == nested


def test_corrupt_empty_and_non_image_files_are_skipped_and_counted(tmp_path, caplog):
    root = make_image_folder(tmp_path / "train", per_class=4)
    (root / "A" / "empty.jpg").write_bytes(b"")
    (root / "B" / "notes.txt").write_text("not an image")
    (root / "C" / "garbage.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg")
    images = dl.scan_image_folder(root)
    assert len(images.samples) == 12
    assert sorted(Path(p).name for p in images.skipped) == ["empty.jpg", "garbage.jpg", "notes.txt"]
    assert "Skipped 3" in caplog.text


def test_truncated_image_is_replaced_by_the_next_one(tmp_path, caplog):
    root = make_image_folder(tmp_path / "train", per_class=2)
    good = root / "A" / "A1.jpg"
    data = good.read_bytes()
    (root / "A" / "A0.jpg").write_bytes(data[: len(data) // 2])  # header intact, pixels missing
    images = dl.scan_image_folder(root)
    ds = dl.ImageDataset(images.samples, dl.eval_transform(B0_CFG))
    bad = [i for i, (p, _) in enumerate(images.samples) if p.endswith("A0.jpg")][0]
    x, y = ds[bad]
    assert x.shape == (3, 224, 224) and y == 0
    torch.testing.assert_close(x, ds[bad + 1][0])
    assert "Skipping unreadable image" in caplog.text


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: make_image_folder(p / "one", classes=("A",), per_class=3), "at least 2"),
])
def test_unusable_folders_say_what_to_do(tmp_path, make, message):
    with pytest.raises(dl.DatasetError, match=message) as err:
        dl.scan_image_folder(make(tmp_path))
    assert "--xtrain_path" in str(err.value)


def test_folder_without_images_is_reported(tmp_path):
    for c in "AB":
        (tmp_path / c).mkdir()
        (tmp_path / c / "readme.txt").write_text("x")
    with pytest.raises(dl.DatasetError, match="No readable images"):
        dl.scan_image_folder(tmp_path)


def test_offline_download_fails_with_a_clear_message(monkeypatch):
    # no network here: the real kagglehub call fails; the error must name the fix, not be a urllib traceback
    monkeypatch.setenv("KAGGLEHUB_CACHE", "/nonexistent-cache-dir")
    with pytest.raises(dl.DatasetError, match="--xtrain_path") as err:
        dl.download_dataset()
    assert "grassknoted/asl-alphabet" in str(err.value)


def test_kaggle_handles_are_told_from_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "mine").mkdir(parents=True)
    assert dl.is_kaggle_handle("grassknoted/asl-alphabet") and dl.is_kaggle_handle("ayuraj/asl-dataset")
    assert not dl.is_kaggle_handle("data/mine")  # a folder here wins over a dataset of that name
    assert not any(map(dl.is_kaggle_handle, ["../shared/asl/train", "a/b/c", "train", "/abs/x", "-x/y"]))


def test_a_kaggle_handle_is_downloaded_and_its_class_folder_found(tmp_path, monkeypatch):
    import kagglehub

    # two layouts seen on Kaggle: the ASL alphabet's (class folders two levels down, flat test images beside
    # them) and one of lower-case class folders in a folder named twice
    alphabet = tmp_path / "alphabet"
    make_image_folder(alphabet / "asl_alphabet_train" / "asl_alphabet_train", per_class=2)
    (alphabet / "asl_alphabet_test" / "asl_alphabet_test").mkdir(parents=True)
    shutil.copy(next((alphabet / "asl_alphabet_train" / "asl_alphabet_train" / "A").iterdir()),
                alphabet / "asl_alphabet_test" / "asl_alphabet_test" / "A_test.jpg")
    other = tmp_path / "other"
    make_image_folder(other / "asl_dataset" / "asl_dataset", classes=("a", "b"), per_class=2)
    asked = []
    monkeypatch.setattr(kagglehub, "dataset_download",
                        lambda handle: asked.append(handle) or str(alphabet if "alphabet" in handle else other))
    assert dl.training_folder("grassknoted/asl-alphabet") == alphabet / "asl_alphabet_train" / "asl_alphabet_train"
    assert dl.training_folder("ayuraj/asl-dataset") == other / "asl_dataset" / "asl_dataset"
    assert asked == ["grassknoted/asl-alphabet", "ayuraj/asl-dataset"]
    images = dl.scan_folders([dl.training_folder("grassknoted/asl-alphabet"), dl.training_folder("ayuraj/asl-dataset")])
    assert images.classes == ["A", "B", "C"]  # a/ and b/ merged into A and B


def test_an_unreachable_kaggle_handle_is_named_in_one_clear_message(monkeypatch):
    monkeypatch.setenv("KAGGLEHUB_CACHE", "/nonexistent-cache-dir")
    with pytest.raises(dl.DatasetError, match="'someone/asl-photos'.*internet connection"):
        dl.training_folder("someone/asl-photos")


@pytest.mark.parametrize("split_by", ["random", "block"])
def test_split_is_stratified_disjoint_and_reproducible(tmp_path, split_by):
    images = dl.scan_image_folder(make_image_folder(tmp_path, classes=("A", "B", "C", "D"), per_class=40, size=8))
    train, val = dl.split_samples(images.samples, 0.25, seed=3, split_by=split_by)
    assert set(train).isdisjoint(val) and sorted(train + val) == list(range(len(images.samples)))
    assert Counter(images.samples[i][1] for i in val) == {0: 10, 1: 10, 2: 10, 3: 10}
    assert dl.split_samples(images.samples, 0.25, seed=3, split_by=split_by) == (train, val)
    assert dl.split_samples(images.samples, 0.25, seed=4, split_by=split_by)[1] != val


def test_block_split_holds_out_runs_of_consecutive_frames(tmp_path):
    images = dl.scan_image_folder(make_image_folder(tmp_path, classes=("A", "B"), per_class=100, size=8))
    assert dl.resolve_split_by(images.samples, "auto") == "block"
    _, val = dl.split_samples(images.samples, 0.1, seed=0)
    for label in (0, 1):
        frames = sorted(dl.frame_number(images.samples[i][0]) for i in val if images.samples[i][1] == label)
        assert len(frames) == 10
        # 20 blocks of 5 frames: two whole blocks, each a run of consecutive frame numbers
        runs = np.split(frames, np.where(np.diff(frames) != 1)[0] + 1)
        assert all(len(r) % 5 == 0 for r in runs)


def test_names_without_frame_numbers_fall_back_to_random(tmp_path):
    root = make_image_folder(tmp_path, per_class=5, size=8)
    shutil.move(root / "A" / "A1.jpg", root / "A" / "hand.jpg")
    images = dl.scan_image_folder(root)
    assert dl.resolve_split_by(images.samples, "auto") == "random"


def test_bad_val_split_is_rejected(synthetic_dir):
    images = dl.scan_image_folder(synthetic_dir)
    with pytest.raises(dl.DatasetError, match="--val_split"):
        dl.split_samples(images.samples, 1.5, seed=0)


def test_eval_transform_matches_the_weights_preset(synthetic_dir):
    path = next((synthetic_dir / "A").iterdir())
    ours = dl.eval_transform(B0_CFG)(image_io.load_rgb(path))
    preset = EfficientNet_B0_Weights.DEFAULT.transforms()(Image.open(path).convert("RGB"))
    torch.testing.assert_close(ours, preset)


def test_train_transform_augments_and_keeps_the_shape(synthetic_dir):
    img = image_io.load_rgb(next((synthetic_dir / "B").iterdir()))
    cfg = dict(B0_CFG, resize_size=73, crop_size=64)
    a, b = dl.train_transform(cfg, augment=True)(img), dl.train_transform(cfg, augment=True)(img)
    assert a.shape == b.shape == (3, 64, 64) and not torch.equal(a, b)
    torch.testing.assert_close(dl.train_transform(cfg, augment=False)(img), dl.eval_transform(cfg)(img))


@pytest.mark.parametrize("hflip", [False, True])
def test_train_transform_mirrors_only_with_hflip(hflip):
    # left half dark, right half bright: a mirrored crop has its bright side on the left
    pixels = np.zeros((96, 96, 3), np.uint8)
    pixels[:, 48:] = 255
    img = Image.fromarray(pixels)
    cfg = dict(B0_CFG, resize_size=73, crop_size=64)
    transform = dl.train_transform(cfg, augment=True, hflip=hflip)
    torch.manual_seed(0)
    mirrored = [bool(x[:, :, :16].mean() > x[:, :, -16:].mean()) for x in (transform(img) for _ in range(40))]
    assert any(mirrored) == hflip and all(mirrored) is False


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "I;16", "P"])
def test_load_rgb_converts_every_mode(tmp_path, mode):
    arr = np.full((20, 30), 40000 if mode == "I;16" else 120, dtype=np.uint16 if mode == "I;16" else np.uint8)
    img = Image.fromarray(arr) if mode in ("L", "I;16") else Image.new(mode, (30, 20))
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    img.save(path)
    out = image_io.load_rgb(path)
    assert out.mode == "RGB" and out.size == (30, 20)
    if mode == "I;16":
        assert out.getpixel((0, 0)) == (156, 156, 156)  # 40000 / 256, not clipped to white


def test_load_rgb_applies_exif_rotation(tmp_path):
    img = Image.new("RGB", (30, 20))
    exif = img.getexif()
    exif[0x0112] = 6  # rotated 90 degrees
    img.save(tmp_path / "r.jpg", exif=exif)
    assert image_io.load_rgb(tmp_path / "r.jpg").size == (20, 30)


def test_distributed_loaders_cover_the_data(synthetic_dir):
    images = dl.scan_image_folder(synthetic_dir)
    ds = dl.ImageDataset(images.samples[:35], dl.eval_transform(dict(B0_CFG, resize_size=16, crop_size=16)))
    val_shards = [list(dl.make_loader(ds, 4, train=False, rank=r, world_size=2, num_workers=0).sampler)
                  for r in range(2)]
    assert sorted(val_shards[0] + val_shards[1]) == list(range(35))  # no padding, no duplicates
    train = [dl.make_loader(ds, 4, train=True, rank=r, world_size=2, num_workers=0) for r in range(2)]
    assert all(isinstance(t.sampler.sampler, torch.utils.data.DistributedSampler) for t in train)
    assert len({i for t in train for i, _ in t.sampler}) == 35


def test_single_process_training_order_depends_only_on_seed_and_epoch(synthetic_dir):
    images = dl.scan_image_folder(synthetic_dir)
    orders = []
    for _ in range(2):
        loader = dl.make_loader(images.samples, 4, train=True, num_workers=0, seed=1)
        loader.sampler.set_epoch(3)
        orders.append(list(loader.sampler))
    assert orders[0] == orders[1]
    assert [i for i, _ in orders[0]] != list(range(len(images.samples)))
    assert len({seed for _, seed in orders[0]}) == len(images.samples)  # every image its own augmentation seed


def _hands(n: int) -> list[hands.Hand]:
    rng = np.random.default_rng(0)
    return [hands.Hand(rng.uniform(0.3, 0.7, (21, 3)).astype(np.float32),
                       rng.normal(0, 0.05, (21, 3)).astype(np.float32), ("Left", "Right")[i % 2], 0.9)
            for i in range(n)]


def test_hand_batches_are_varied_at_once_and_the_same_again_for_the_same_epoch():
    found, labels = _hands(10), list(range(10))  # a class per hand: a batch says which hands it drew
    plain = dl.HandDataset(found, labels, augment=False)
    features, targets = next(iter(dl.make_loader(plain, 10, train=False, num_workers=0)))
    assert torch.equal(features, torch.from_numpy(np.stack([hands.features(h) for h in found])))
    assert targets.tolist() == labels
    features, targets = next(iter(dl.make_loader(plain, 10, train=True, num_workers=0)))  # shuffled, not varied
    assert torch.equal(features, torch.from_numpy(np.stack([hands.features(found[i]) for i in targets.tolist()])))

    def epoch(number: int, workers: int) -> list[torch.Tensor]:
        loader = dl.make_loader(dl.HandDataset(found, labels, augment=True), 4, train=True, num_workers=workers,
                                seed=1)
        loader.sampler.set_epoch(number)
        return [x for batch in loader for x in batch]

    first = epoch(2, 0)
    assert len(first) == 4 and first[0].shape == (4, hands.N_FEATURES)  # 2 batches of 4 (the rest dropped)
    assert all(torch.equal(a, b) for a, b in zip(first, epoch(2, 2)))  # as a resumed run, with workers or not
    assert not torch.equal(first[0], epoch(3, 0)[0])  # another epoch, other variations
    # varied, not replaced: each row is still near one of the training hands or its mirror image
    rows = torch.from_numpy(np.stack([hands.features(h) for h in found]))
    mirrors = rows.clone()  # x flipped in the landmarks; the world landmarks' distances and angles stay
    mirrors[:, :hands.N_POINT_FEATURES] = (rows[:, :hands.N_POINT_FEATURES].reshape(10, 2, 21, 3)
                                           * torch.tensor([-1.0, 1.0, 1.0])).reshape(10, -1)
    nearest = torch.cdist(first[0], torch.cat([rows, mirrors])).argmin(1) % 10
    assert nearest.tolist() == first[1].tolist()


@requires_shared
def test_real_dataset_layout_is_read_and_block_split():
    images = dl.scan_image_folder(SHARED_ASL / "train")
    assert len(images.classes) == 29 and len(images.samples) == 8700 and not images.skipped
    train, val = dl.split_samples(images.samples, 0.1, seed=0)
    assert len(val) == 29 * 30


# ---------------------------------------------------------------------------------------------- several folders

def test_folders_merge_classes_by_name_whatever_their_case(tmp_path):
    make_image_folder(tmp_path / "kaggle", per_class=4)
    make_image_folder(tmp_path / "mine", classes=("a", "D"), per_class=3)
    images = dl.scan_folders([tmp_path / "kaggle", tmp_path / "mine"])
    assert images.classes == ["A", "B", "C", "D"]  # the first spelling, sorted as one folder would be
    mine = [(Path(p).name, images.classes[label]) for (p, label), f in zip(images.samples, images.folders) if f == 1]
    assert sorted(mine) == [("D1.jpg", "D"), ("D2.jpg", "D"), ("D3.jpg", "D"),
                            ("a1.jpg", "A"), ("a2.jpg", "A"), ("a3.jpg", "A")]
    assert images.roots == [str(tmp_path / "kaggle"), str(tmp_path / "mine")]


def test_a_model_s_classes_keep_their_order_and_new_ones_follow(tmp_path):
    make_image_folder(tmp_path / "mine", classes=("d", "b", "E"), per_class=2)
    images = dl.scan_folders([tmp_path / "mine"], known_classes=["C", "B", "A"])
    assert images.classes == ["C", "B", "A", "E", "d"]
    assert {images.classes[label] for _, label in images.samples} == {"B", "E", "d"}


def test_the_same_folder_twice_is_refused(tmp_path):
    make_image_folder(tmp_path / "data", per_class=2)
    with pytest.raises(dl.DatasetError, match="names the same folder twice"):
        dl.scan_folders([tmp_path / "data", tmp_path / "data" / "." ])


def test_each_folder_is_split_on_its_own(tmp_path):
    make_image_folder(tmp_path / "big", per_class=40)
    make_image_folder(tmp_path / "small", classes=("A", "B"), per_class=10)
    images = dl.scan_folders([tmp_path / "big", tmp_path / "small"])
    rule = dl.SplitRule(0.2, seed=1)
    train, val, blocks = dl.split_folders(images, [rule, rule])
    assert not set(train) & set(val) and sorted(train + val) == list(range(len(images.samples)))
    val_by_folder = Counter((images.folders[i], images.samples[i][1]) for i in val)
    assert val_by_folder == {(0, 0): 8, (0, 1): 8, (0, 2): 8, (1, 0): 2, (1, 1): 2}  # a fifth of each folder
    # the big folder is split exactly as it would be alone, so adding a folder never moves its held-out images
    alone = dl.scan_folders([tmp_path / "big"])
    assert [images.samples[i] for i in val if images.folders[i] == 0] == \
        [alone.samples[i] for i in dl.split_samples(alone.samples, 0.2, 1)[1]]
    assert len(set(blocks[i] for i in range(len(blocks)) if images.folders[i] == 0)
               & set(blocks[i] for i in range(len(blocks)) if images.folders[i] == 1)) == 0


def test_a_replayed_folder_keeps_a_spread_sample_of_its_training_side(tmp_path):
    make_image_folder(tmp_path / "data", per_class=60)
    images = dl.scan_folders([tmp_path / "data"])
    full_train, full_val, _ = dl.split_folders(images, [dl.SplitRule(0.1, seed=0)])
    train, val, _ = dl.split_folders(images, [dl.SplitRule(0.1, seed=0, per_class=5)])
    assert set(train) <= set(full_train) and set(val) <= set(full_val)
    assert Counter(images.samples[i][1] for i in train) == {0: 5, 1: 5, 2: 5}
    frames = sorted(dl.frame_number(images.samples[i][0]) for i in train if images.samples[i][1] == 0)
    assert frames[-1] - frames[0] > 40  # spread over the class's frames, not its first five
    assert val == full_val  # a cap on the training side leaves the held-out images as they were
    _, few_val, _ = dl.split_folders(images, [dl.SplitRule(0.1, seed=0, per_class=5, val_per_class=2)])
    assert set(few_val) <= set(full_val) and Counter(images.samples[i][1] for i in few_val) == {0: 2, 1: 2, 2: 2}


def test_runs_from_before_several_folders_are_read_as_one(tmp_path):
    legacy = {"data_root": "data", "split_by": "block", "args": {"val_split": 0.2, "seed": 3}}
    assert dl.recorded_folders(legacy) == [("data", dl.SplitRule(0.2, 3, "block"))]
    assert dl.recorded_val({"val": ["A/A1.jpg"]}, legacy) == [("data", ["A/A1.jpg"])]
    replayed = {"folders": [{"root": "x", "rule": {"val_split": 0.1, "seed": 0, "split_by": "random", "per_class": 4}}]}
    # a replay rule from before `val_per_class` held out at most VAL_PER_CLASS images per class
    assert dl.recorded_folders(replayed) == [("x", dl.SplitRule(0.1, 0, "random", 4, dl.VAL_PER_CLASS))]
    capped = {"folders": [{"root": "x", "rule": {"val_split": 0.1, "seed": 0, "split_by": "random", "per_class": 4,
                                                 "val_per_class": None}}]}
    assert dl.recorded_folders(capped) == [("x", dl.SplitRule(0.1, 0, "random", 4))]
