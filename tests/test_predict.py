"""predict: what a load failure says, and that serving loads no training or tracking code."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import image_io
import model as models
import predict
import run_artifacts
from conftest import ROOT, SHARED_ASL, requires_shared

ARCH = "efficientnet_lite0"
CFG = {"resize_size": 32, "crop_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}


def checkpoint(path, num_classes: int = 3, **metadata):
    net = models.build_model(ARCH, num_classes, weights="none")
    meta = {"arch": ARCH, "num_classes": num_classes, "classes": [f"c{i}" for i in range(num_classes)],
            "transform": CFG, **metadata}
    run_artifacts.save_checkpoint({"model": net.state_dict(), "metadata": meta}, path)
    return path


def test_a_checkpoint_loads_into_a_predictor(tmp_path):
    p = predict.load_predictor(checkpoint(tmp_path / "ok.pt"))
    assert p.classes == ["c0", "c1", "c2"] and p.predict_batch(torch.rand(2, 3, 32, 32)).shape == (2, 3)


def test_weights_that_do_not_fit_the_metadata_name_the_cause(tmp_path):
    path = checkpoint(tmp_path / "m.pt", num_classes=29)
    ckpt = run_artifacts.load_checkpoint(path)
    ckpt["metadata"].update(num_classes=10, classes=[f"c{i}" for i in range(10)])
    run_artifacts.save_checkpoint(ckpt, path)
    with pytest.raises(predict.ModelLoadError) as err:
        predict.load_predictor(path)
    message = str(err.value)
    assert "the checkpoint has 29 classes but its metadata says 10" in message
    assert f"{models.HEAD_WEIGHT} is (29, 1280), not (10, 1280)" in message
    assert "not a checkpoint written by" not in message


@pytest.mark.parametrize("edit, cause", [
    (lambda c: c.pop("metadata"), "it has no metadata"),
    (lambda c: c["metadata"].pop("transform"), "its metadata has no transform"),
    (lambda c: c["metadata"].update(classes=["x"]), "lists 1 classes but says num_classes 3"),
])
def test_an_incomplete_checkpoint_says_what_it_lacks(tmp_path, edit, cause):
    path = checkpoint(tmp_path / "m.pt")
    ckpt = run_artifacts.load_checkpoint(path)
    edit(ckpt)
    run_artifacts.save_checkpoint(ckpt, path)
    with pytest.raises(predict.ModelLoadError, match=cause):
        predict.load_predictor(path)


TRAINING_OR_TRACKING = ("pt_engine", "pt_train", "log_experiment", "calibration", "mlflow", "torchmetrics",
                        "data_sources")


def test_serving_imports_no_training_or_tracking_module():
    # in a fresh interpreter: this one has imported everything. tqdm is not on the list: `import torch` loads it
    code = ("import sys\n"
            f"for module in ('predict', 'export', 'app', 'spell'):\n"
            f"    __import__(module)\n"
            f"    print(module, [m for m in {TRAINING_OR_TRACKING!r} if m in sys.modules])\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[:4] == ["predict []", "export []", "app []", "spell []"]


def test_decide_answers_only_when_sure_and_a_hand_is_there():
    classes = ["A", "B", "nothing"]
    sure_a = torch.tensor([0.6, 0.3, 0.1])
    assert predict.decide(classes, sure_a, None, 0.5) == predict.Verdict("A", pytest.approx(0.6), True, False)
    assert predict.decide(classes, sure_a, True, 0.6).answered
    assert not predict.decide(classes, sure_a, True, 0.61).answered  # unsure
    no_hand = predict.decide(classes, sure_a, False, 0.5)
    assert no_hand.no_hand and not no_hand.answered  # no hand found: no letter, however sure
    empty = predict.decide(classes, torch.tensor([0.1, 0.1, 0.8]), None, 0.5)
    assert empty.no_hand and not empty.answered  # the empty scene and "no hand" are one answer
    assert predict.decide(classes, sure_a, True, 0.5, agreed=True).answered
    differ = predict.decide(classes, sure_a, True, 0.5, agreed=False)  # the two networks name other classes
    assert differ.disagreed and not differ.sure and not differ.answered and differ.label == "A"


def test_a_predictor_s_verdict_is_the_app_s_decision_for_its_kind_of_model(tmp_path):
    import hands

    image_only = predict.load_predictor(checkpoint(tmp_path / "m.pt"))
    probs = torch.tensor([0.2, 0.7, 0.1])
    assert image_only.verdict(predict.Reading(probs, None)) == predict.decide(image_only.classes, probs, None)
    assert image_only.verdict(predict.Reading(probs, None)).answered  # it never looks for a hand
    path = checkpoint(tmp_path / "h.pt", hands={"hidden": 16, "features": hands.N_FEATURES, "temperature": 1.0})
    ckpt = run_artifacts.load_checkpoint(path)
    ckpt["hand_net"] = models.LandmarkNet(3, hands.N_FEATURES, 16).state_dict()
    run_artifacts.save_checkpoint(ckpt, path)
    hand_aware = predict.load_predictor(path)
    assert hand_aware.verdict(predict.Reading(probs, None)).no_hand  # it looked, and found none
    assert not hand_aware.verdict(predict.Reading(probs, None), threshold=0.8).sure


def test_the_onnx_backend_serves_a_given_export_and_writes_nothing(tmp_path):
    (tmp_path / "run").mkdir()
    path = checkpoint(tmp_path / "run" / "m.pt")
    plain = predict.load_predictor(path)
    export = predict.export_onnx(plain.model, tmp_path / "elsewhere.onnx", (3, 32, 32))
    fast = predict.load_predictor(path, backend="onnx", onnx_file=export)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["m.pt"]  # nothing exported beside it
    batch = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(fast.predict_batch(batch), plain.predict_batch(batch), atol=1e-5, rtol=1e-4)


def test_pooling_is_the_renormalised_geometric_mean():
    frame, hand = torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([[0.1, 0.8, 0.1]])
    expected = (frame * hand).sqrt() / (frame * hand).sqrt().sum()
    torch.testing.assert_close(predict.pool(frame, hand), expected)
    # a class one network rules out stays out, however sure the other is of it
    sure_wrong, rules_out = torch.tensor([0.98, 0.01, 0.01]), torch.tensor([0.0, 0.6, 0.4])
    pooled = predict.pool(sure_wrong, rules_out)
    assert int(pooled.argmax()) == 1 and float(pooled[0]) < 1e-10 and not pooled.isnan().any()
    assert int(((sure_wrong + rules_out) / 2).argmax()) == 0  # the average follows the sure one
    torch.testing.assert_close(predict.pool(frame, frame), frame)  # agreeing models: unchanged


@requires_shared
@pytest.mark.slow
def test_a_hand_aware_predictor_pools_where_it_finds_a_hand(hand_run):
    from PIL import Image

    import hands
    import image_io

    predictor = predict.load_predictor(hand_run)
    with_hand = image_io.load_rgb(SHARED_ASL / "train" / "B" / "B1300.jpg")
    blank = Image.new("RGB", (200, 200), (90, 120, 160))
    readings = predictor.read([with_hand, blank])
    assert readings[0].hand is not None and readings[1].hand is None
    frame = predictor.predict_batch(torch.stack([predictor.preprocess(predictor.model_input(im, r.hand))
                                                 for im, r in zip((with_hand, blank), readings)]))
    torch.testing.assert_close(readings[1].probs, frame[1])  # no hand: the image network alone
    features = torch.from_numpy(hands.features(readings[0].hand))[None]
    with torch.no_grad():
        hand_probs = torch.softmax(predictor.hand_net(features) / predictor.metadata["hands"]["temperature"], 1)
    torch.testing.assert_close(readings[0].probs, predict.pool(frame[0], hand_probs[0]))
    assert readings[0].agreed == (int(frame[0].argmax()) == int(hand_probs[0].argmax())) and readings[1].agreed is None
    assert predictor.verdict(readings[0], 0.0) == predict.decide(predictor.classes, readings[0].probs, True, 0.0,
                                                                 readings[0].agreed)
    assert predictor.verdict(readings[1], 0.0).no_hand  # no hand found: no letter, however sure
    assert float(readings[0].probs.sum()) == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(predictor.predict([with_hand, blank]), torch.stack([r.probs for r in readings]))
    # the ONNX backend serves the image network; the hand network is the same tiny torch module
    fast = predict.load_predictor(hand_run, backend="onnx")
    torch.testing.assert_close(fast.predict([with_hand, blank]), predictor.predict([with_hand, blank]),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("margin", [1.5, None])
def test_a_crop_model_s_image_network_reads_the_square_around_the_hand(tmp_path, monkeypatch, margin):
    import numpy as np
    from PIL import Image

    import hands

    path = checkpoint(tmp_path / "m.pt", hands={"hidden": 16, "features": hands.N_FEATURES, "temperature": 1.0,
                                                "crop": margin})
    ckpt = run_artifacts.load_checkpoint(path)
    ckpt["hand_net"] = models.LandmarkNet(3, hands.N_FEATURES, 16).state_dict()
    run_artifacts.save_checkpoint(ckpt, path)
    predictor = predict.load_predictor(path)
    assert predictor.crop_margin == margin
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 120, 3), dtype=np.uint8))
    points = np.random.default_rng(1).uniform(0.5, 0.8, (21, 3)).astype(np.float32)
    hand = hands.Hand(points, points, "Right", 0.9, 1.5)
    monkeypatch.setattr(predictor, "find_hands", lambda images: [hand, None][:len(images)])
    readings = predictor.read([image, image])
    seen = predictor.model_input(image, hand)
    if margin:  # the square around the hand where one is found, the whole image where none is
        left, top, right, bottom = hands.crop_box(hand.box, image.size, margin)
        assert seen.size == (right - left, bottom - top) and right - left == bottom - top < 80
    else:
        assert seen is image
    assert predictor.model_input(image, None) is image
    frame = predictor.predict_batch(torch.stack([predictor.preprocess(seen), predictor.preprocess(image)]))
    expected, agreed = predictor.combine(frame, [hand, None])
    torch.testing.assert_close(torch.stack([r.probs for r in readings]), expected)
    assert [r.agreed for r in readings] == agreed
    loader = predictor.file_loader(["x.png"], [hand])
    assert (loader.boxes == {"x.png": hand.box} and loader.margin == margin) if margin else loader is image_io.load_rgb


def test_a_model_from_before_the_viewpoint_features_reads_the_landmarks_alone(tmp_path):
    import numpy as np

    import hands

    # its checkpoint records no "features": its landmark network reads the first N_POINT_FEATURES
    path = checkpoint(tmp_path / "old.pt", hands={"hidden": 16, "temperature": 1.0, "crop": None})
    ckpt = run_artifacts.load_checkpoint(path)
    ckpt["hand_net"] = models.LandmarkNet(3, hands.N_POINT_FEATURES, 16).state_dict()
    run_artifacts.save_checkpoint(ckpt, path)
    predictor = predict.load_predictor(path)
    points = np.random.default_rng(1).uniform(0.3, 0.7, (21, 3)).astype(np.float32)
    hand = hands.Hand(points, points - points.mean(0), "Right", 0.9)
    frame = torch.tensor([[0.5, 0.3, 0.2]])
    probs, _ = predictor.combine(frame, [hand])
    with torch.no_grad():
        hand_probs = torch.softmax(predictor.hand_net(torch.from_numpy(hands.features(hand)[None, :126])), 1)
    torch.testing.assert_close(probs[0], predict.pool(frame[0], hand_probs[0]))


def test_a_hand_network_that_does_not_fit_is_named(tmp_path):
    path = checkpoint(tmp_path / "hand.pt", hands={"hidden": 256, "temperature": 1.0})
    ckpt = run_artifacts.load_checkpoint(path)
    ckpt["hand_net"] = models.LandmarkNet(5, 126, 256).state_dict()  # 5 classes, the metadata says 3
    run_artifacts.save_checkpoint(ckpt, path)
    with pytest.raises(predict.ModelLoadError, match="hand network does not fit"):
        predict.load_predictor(path)


@pytest.mark.parametrize("verbose", ["0", "1"])
def test_the_onnx_export_prints_its_progress_only_when_verbose(tmp_path, capsys, monkeypatch, verbose):
    monkeypatch.setenv("ASL_VERBOSE", verbose)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 3))
    assert predict.export_onnx(net, tmp_path / "net.onnx", (3, 16, 16)).is_file()
    assert ("[torch.onnx]" in capsys.readouterr().out) == (verbose == "1")
