"""predict: what a load failure says, and that serving loads no training or tracking code."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import model as models
import predict
import run_artifacts
from conftest import ROOT

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


TRAINING_OR_TRACKING = ("pt_engine", "pt_train", "log_experiment", "calibration", "mlflow", "torchmetrics")


def test_serving_imports_no_training_or_tracking_module():
    # in a fresh interpreter: this one has imported everything. tqdm is not on the list: `import torch` loads it
    code = ("import sys\n"
            f"for module in ('predict', 'app'):\n"
            f"    __import__(module)\n"
            f"    print(module, [m for m in {TRAINING_OR_TRACKING!r} if m in sys.modules])\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[:2] == ["predict []", "app []"]
