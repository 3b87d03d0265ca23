"""export: both networks as ONNX, which ONNX Runtime runs to the same logits as PyTorch, with model.json saying
how to feed them."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime
import pytest
import torch

import export
import hands
import model as models
import predict
import run_artifacts

CFG = {"resize_size": 36, "crop_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
CLASSES = ["A", "B", "nothing"]


def hand_aware_checkpoint(path, features: int = hands.N_FEATURES):
    """Random weights in train mode for a few batches, so BatchNorm's statistics are not the identity."""
    torch.manual_seed(0)
    net, hand_net = models.build_model("efficientnet_lite0", 3, weights="none"), models.LandmarkNet(3, features, 16)
    with torch.no_grad():
        net.train()(torch.rand(8, 3, 32, 32))
        hand_net.train()(torch.randn(8, features))
    meta = {"arch": "efficientnet_lite0", "num_classes": 3, "classes": CLASSES, "transform": CFG, "temperature": 0.7,
            "hands": {"hidden": 16, "features": features, "temperature": 1.3, "crop": hands.CROP_MARGIN}}
    run_artifacts.save_checkpoint({"model": net.state_dict(), "metadata": meta, "hand_net": hand_net.state_dict()},
                                  path)
    return path


def run_onnx(path, inputs: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    return session.run(None, {name: inputs})[0]


def test_both_networks_run_in_onnx_runtime_as_in_pytorch(tmp_path):
    source = hand_aware_checkpoint(tmp_path / "m.pt")
    assert export.main([str(source), str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted([export.IMAGE_NET, export.LANDMARK_NET, export.MODEL_JSON])
    described = json.loads((out / export.MODEL_JSON).read_text())
    assert described == {"classes": CLASSES, "transform": CFG, "temperature": 0.7,
                         "hands": {"features": hands.N_FEATURES, "temperature": 1.3, "crop": hands.CROP_MARGIN}}

    predictor = predict.load_predictor(source)
    images = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)  # any batch size
    features = np.random.default_rng(1).normal(size=(5, hands.N_FEATURES)).astype(np.float32)
    with torch.no_grad():
        image_logits = predictor.model(torch.from_numpy(images)).numpy()
        hand_logits = predictor.hand_net(torch.from_numpy(features)).numpy()
    np.testing.assert_allclose(run_onnx(out / export.IMAGE_NET, images), image_logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(run_onnx(out / export.LANDMARK_NET, features), hand_logits, rtol=1e-4, atol=1e-5)
    session = onnxruntime.InferenceSession(str(out / export.LANDMARK_NET), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape[1]) for i in session.get_inputs()] == [("features", hands.N_FEATURES)]


def missing_model(tmp):
    return tmp / "nowhere", tmp / "out"


def output_under_a_file(tmp):
    (tmp / "file").write_text("")
    return hand_aware_checkpoint(tmp / "m.pt"), tmp / "file" / "out"


@pytest.mark.parametrize("make_target, message", [(missing_model, "does not exist"),
                                                  (output_under_a_file, "Could not write to")])
def test_what_cannot_be_exported_is_one_line(tmp_path, capsys, make_target, message):
    source, out = make_target(tmp_path)
    assert export.main([str(source), str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
