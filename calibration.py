"""Probability calibration: measure expected calibration error and fit a temperature on held-out logits.

The app's "unsure" threshold only means something if a predicted 0.9 is right about 90% of the time.
Temperature scaling (Guo et al., 2017) divides the logits by one scalar fitted on the validation set: it
changes confidence, never the predicted class. The fitted value is stored with the model.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torchmetrics.functional.classification import multiclass_calibration_error

CROSS_FIT_BLOCKS = 10  # runs of consecutive images that alternate between the folds when no groups are given


def expected_calibration_error(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                               n_bins: int = 15) -> float:
    """ECE (L1, equal-width confidence bins) of softmax(logits / temperature)."""
    probs = torch.softmax(logits.float() / temperature, dim=1)
    return float(multiclass_calibration_error(probs, targets, num_classes=logits.shape[1], n_bins=n_bins))


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 200) -> float:
    """The temperature that minimises the negative log-likelihood of `targets` (optimised in log space so it
    stays positive)."""
    logits = logits.detach().float()
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


@torch.no_grad()
def collect_logits(model: torch.nn.Module, loader, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets of a whole loader (eval mode)."""
    model.eval().to(device)
    logits, targets = [], []
    for images, labels in loader:
        logits.append(model(images.to(device)).float().cpu())
        targets.append(labels)
    return torch.cat(logits), torch.cat(targets)


def cross_fit_folds(n: int, groups: Sequence[Hashable] | None = None) -> torch.Tensor:
    """Which of `n` images fall in the first of two cross-fitting folds (a bool mask).

    Images of one group (e.g. the split's block of consecutive video frames, near-duplicates of each other)
    always share a fold, the groups alternating between the two; without groups, CROSS_FIT_BLOCKS runs of
    consecutive images do, since a frame-ordered validation set has its near-duplicates side by side.
    """
    if groups is None:
        groups = [i * CROSS_FIT_BLOCKS // max(n, 1) for i in range(n)]
    if len(groups) != n:
        raise ValueError(f"{len(groups)} groups for {n} images")
    position = {g: k for k, g in enumerate(dict.fromkeys(groups))}
    return torch.tensor([position[g] % 2 == 0 for g in groups], dtype=torch.bool)


def calibrate(model: torch.nn.Module, loader, device: torch.device | str = "cpu",
              groups: Sequence[Hashable] | None = None) -> dict:
    """Fit a temperature on `loader`, and keep it only if it lowers the calibration error on images it was not
    fitted on.

    The ECE after scaling is measured by 2-fold cross-fitting (fit on one fold, measure on the other, both
    ways), since a temperature fitted and scored on the same images flatters itself; the folds keep each of
    `groups` (one per image, in the loader's order) together, see `cross_fit_folds`. Fitting minimises NLL,
    which does not always lower ECE (an under-confident model trained with label smoothing, a tiny validation
    set); then the temperature stays 1.
    """
    return calibrate_logits(*collect_logits(model, loader, device), groups)


def calibrate_logits(logits: torch.Tensor, targets: torch.Tensor, groups: Sequence[Hashable] | None = None) -> dict:
    """`calibrate` on logits already collected."""
    fold = cross_fit_folds(len(targets), groups)
    ece_before = expected_calibration_error(logits, targets)
    if fold.all() or not fold.any():  # one group only: nothing to measure a fitted temperature on
        scaled = logits
    else:
        scaled = torch.empty_like(logits)
        for held_out in (fold, ~fold):
            scaled[held_out] = logits[held_out] / fit_temperature(logits[~held_out], targets[~held_out])
    ece_scaled = expected_calibration_error(scaled, targets)
    applied = ece_scaled < ece_before
    temperature = fit_temperature(logits, targets) if applied else 1.0
    nll = torch.nn.functional.cross_entropy
    return {"temperature": temperature, "applied": applied, "n_images": len(targets),
            "nll_before": float(nll(logits, targets)), "nll_after": float(nll(logits / temperature, targets)),
            "ece_before": ece_before, "ece_after_cross_fitted": ece_scaled,
            "ece_after": ece_scaled if applied else ece_before}
