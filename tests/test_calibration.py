"""calibration: ECE against a hand-checked case, temperature fitting, and the temperature stored by training."""
from __future__ import annotations

import json

import pytest
import torch

import calibration
import predict


def test_ece_of_a_known_case():
    # two bins: confidence 0.9 (right 1 of 2) and 0.6 (right 2 of 2): ECE = 0.5*|0.9-0.5| + 0.5*|0.6-1.0| = 0.4
    p_hi, p_lo = torch.log(torch.tensor([0.9, 0.1])), torch.log(torch.tensor([0.6, 0.4]))
    logits = torch.stack([p_hi, p_hi, p_lo, p_lo])
    targets = torch.tensor([0, 1, 0, 0])
    assert calibration.expected_calibration_error(logits, targets, n_bins=10) == pytest.approx(0.4, abs=1e-5)


def test_fitted_temperature_undoes_overconfidence():
    torch.manual_seed(0)
    true_logits = torch.randn(4000, 5) * 1.5
    targets = torch.distributions.Categorical(logits=true_logits).sample()
    overconfident = true_logits * 3  # a model three times too sure of itself
    t = calibration.fit_temperature(overconfident, targets)
    assert t == pytest.approx(3.0, rel=0.1)
    before = calibration.expected_calibration_error(overconfident, targets)
    assert calibration.expected_calibration_error(overconfident, targets, t) < before / 3


class _Fixed(torch.nn.Module):
    """A 'model' that returns given logits, batch by batch."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits, self.at = logits, 0
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.logits[self.at:self.at + len(x)]
        self.at += len(x)
        return out


def _loader(targets: torch.Tensor, batch: int = 100):
    return [(torch.zeros(len(t), 1), t) for t in targets.split(batch)]


def test_calibrate_applies_a_temperature_that_helps_on_held_out_halves():
    torch.manual_seed(0)
    true_logits = torch.randn(2000, 5) * 1.5
    targets = torch.distributions.Categorical(logits=true_logits).sample()
    report = calibration.calibrate(_Fixed(true_logits * 3), _loader(targets))
    assert report["applied"] and report["temperature"] == pytest.approx(3.0, rel=0.1)
    assert report["ece_after"] == report["ece_after_cross_fitted"] < report["ece_before"] / 3


def test_calibrate_keeps_temperature_1_when_scaling_cannot_lower_the_error():
    targets = torch.arange(200) % 5
    sure_and_right = torch.nn.functional.one_hot(targets, 5).float() * 30  # ECE is already 0
    report = calibration.calibrate(_Fixed(sure_and_right), _loader(targets))
    assert not report["applied"] and report["temperature"] == 1.0
    assert report["ece_after"] == report["ece_before"]


def test_training_stores_the_temperature_and_the_predictor_uses_it(trained_run):
    report = json.loads((trained_run / "calibration.json").read_text())
    assert report["temperature"] > 0 and report["n_images"] > 0
    assert report["nll_after"] <= report["nll_before"] + 1e-6  # the fit minimises NLL; ECE is reported
    assert 0 <= report["ece_after"] <= 1
    p = predict.load_predictor(trained_run)
    assert p.metadata["temperature"] == pytest.approx(report["temperature"])
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        logits = p.model(x)
    torch.testing.assert_close(p.predict_batch(x), torch.softmax(logits / report["temperature"], 1))


def video_blocks(seed: int, n_blocks: int = 10, frames: int = 20, classes: int = 5):
    """Logits of a model that is calibrated in truth, on a validation set of video blocks: the frames of a block
    are near-duplicates (the same sign, almost the same logits), as in the Kaggle data. Frame-ordered."""
    g = torch.Generator().manual_seed(seed)
    block_logits = torch.randn(n_blocks, classes, generator=g) * 2
    block_targets = torch.multinomial(torch.softmax(block_logits, 1), 1, generator=g).squeeze(1)
    logits = block_logits.repeat_interleave(frames, 0) + 0.05 * torch.randn(n_blocks * frames, classes, generator=g)
    blocks = torch.arange(n_blocks).repeat_interleave(frames).tolist()
    return logits, block_targets.repeat_interleave(frames), blocks


@pytest.mark.parametrize("seed", [56, 67, 102])
@pytest.mark.parametrize("pass_blocks", [True, False], ids=["split blocks", "consecutive runs"])
def test_a_temperature_that_only_fits_near_duplicates_of_its_own_images_is_not_applied(seed, pass_blocks):
    # A temperature fitted on some frames of a video and scored on its other frames looks like a large gain,
    # though it would not help on new videos: scored on its own images, or on even/odd frames, these sets
    # claim ECE drops well below the unscaled one. Cross-fitting by blocks sees no gain and keeps 1.
    logits, targets, blocks = video_blocks(seed)
    fitted = calibration.fit_temperature(logits, targets)
    ece = calibration.expected_calibration_error
    assert ece(logits, targets, fitted) < ece(logits, targets) - 0.05  # the in-sample mirage this test is about
    report = calibration.calibrate(_Fixed(logits), _loader(targets), groups=blocks if pass_blocks else None)
    assert not report["applied"] and report["temperature"] == 1.0
    assert report["ece_after_cross_fitted"] > report["ece_before"]


def test_cross_fit_folds_keep_groups_together_and_alternate():
    folds = calibration.cross_fit_folds(6, ["a", "a", "b", "b", "c", "a"])
    assert folds.tolist() == [True, True, False, False, True, True]
    default = calibration.cross_fit_folds(40)  # runs of consecutive images, not single positions
    assert default.tolist() == [k % 2 == 0 for k in range(calibration.CROSS_FIT_BLOCKS) for _ in range(4)]
