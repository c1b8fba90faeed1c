"""Fitting what skinlesion.calibration applies: per-class temperatures, the out-of-domain Gaussians and threshold,
and the malignancy threshold, from one checkpoint's outputs on the training and validation lesions (run by
`python -m training.calibrate`; the prediction sets are fitted by training/conformal.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from sklearn.covariance import LedoitWolf

from skinlesion.calibration import Calibration, ClassGaussians, is_malignant, malignant_probability
from skinlesion.model import CLASS_CODES

# Share of new lesions that must pass the out-of-domain check, and the sensitivity the malignancy alert
# must reach on validation lesions.
IN_DOMAIN_PASS_RATE = 0.95
# The threshold lets through this many standard errors more than IN_DOMAIN_PASS_RATE of the validation
# lesions (one-sided 95%): with the plain 95% quantile, resnet34 flagged 6.3% of test lesions.
PASS_RATE_MARGIN_SE = 1.645
MALIGNANCY_SENSITIVITY = 0.90
# Weight, in images, of the whole split's top-label loss in each predicted class's temperature fit, so that a
# class predicted a dozen times stays near the shared temperature (chosen on validation lesions out of fold
# against 10 and 100, docs/training.md).
CLASS_TEMPERATURE_PRIOR_IMAGES = 30


def fit_class_gaussians(train_x: torch.Tensor, train_labels: torch.Tensor, val_x: torch.Tensor) -> ClassGaussians:
    train_x = train_x.double()
    present = [k for k in range(len(CLASS_CODES)) if (train_labels == k).any()]
    means = torch.stack([train_x[train_labels == k].mean(0) for k in present])
    centred = train_x - means[torch.searchsorted(torch.tensor(present), train_labels)]
    precision = torch.from_numpy(LedoitWolf().fit(centred.numpy()).precision_)
    partial = ClassGaussians(means.float(), precision.float(), 0.0, 1.0)
    logs = partial.distances(val_x).clamp_min(1e-12).log()
    return ClassGaussians(means.float(), precision.float(), float(logs.mean()), max(float(logs.std()), 1e-6))


def top_label_loss(logits: torch.Tensor, correct: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per image, the binary cross-entropy between the top probability of softmax(logits / temperature) and
    whether the top label is right."""
    confidence = (logits / temperature).softmax(1).max(1).values.clamp(1e-12, 1 - 1e-12)
    return -(correct * confidence.log() + (1 - correct) * (1 - confidence).log())


def fit_class_temperatures(logits: torch.Tensor, labels: torch.Tensor,
                           prior_images: float = CLASS_TEMPERATURE_PRIOR_IMAGES) -> tuple[float, ...]:
    """One temperature per class, for the images predicted that class: each minimises the top-label loss summed
    over those images plus `prior_images` times its mean over all of them (a class never predicted gets the
    temperature that fits the top label of the whole split)."""
    logits, labels = logits.double(), labels.long()
    predicted = logits.argmax(1)
    correct = (predicted == labels).double()

    def fit(members: torch.Tensor) -> float:
        def loss(log_t: float) -> float:
            everyone = top_label_loss(logits, correct, np.exp(log_t)).mean() if len(logits) else 0.0
            return float(top_label_loss(logits[members], correct[members], np.exp(log_t)).sum() + prior_images * everyone)

        return float(np.exp(minimize_scalar(loss, bounds=(-3.0, 3.0), method="bounded").x))

    return tuple(fit(predicted == k) for k in range(len(CLASS_CODES)))


def validation_pass_rate(n: int) -> float:
    """The share of n validation lesions the threshold lets through, so that at least IN_DOMAIN_PASS_RATE of
    new lesions pass with 95% confidence (0.961 for this project's 997 validation images)."""
    p = IN_DOMAIN_PASS_RATE
    return min(1.0, p + PASS_RATE_MARGIN_SE * float(np.sqrt(p * (1 - p) / max(n, 1))))


def fit_malignancy_threshold(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    """The highest threshold on P(malignant) whose sensitivity on these lesions is at least MALIGNANCY_SENSITIVITY."""
    scores = malignant_probability(probabilities)[is_malignant(labels)].sort(descending=True).values
    if len(scores) == 0:
        return 0.5
    needed = int(np.ceil(MALIGNANCY_SENSITIVITY * len(scores)))
    return float(scores[needed - 1])


@dataclass(frozen=True)
class FitData:
    """One split's raw network outputs, as Predictor.outputs gives them, and its labels."""

    logits: torch.Tensor
    features: torch.Tensor
    statistics: torch.Tensor
    labels: torch.Tensor


def fit_calibration(train: FitData, val: FitData) -> Calibration:
    """Class Gaussians from the training lesions; temperatures, the domain threshold and the malignancy
    threshold from the validation lesions."""
    domain = {
        "input": fit_class_gaussians(train.statistics, train.labels, val.statistics),
        "features": fit_class_gaussians(train.features, train.labels, val.features),
    }
    partial = Calibration(fit_class_temperatures(val.logits, val.labels), 0.0, domain, 0.0)
    scores = partial.domain_score(val.statistics, val.features)
    return dataclasses.replace(
        partial,
        malignancy_threshold=fit_malignancy_threshold(partial.probabilities(val.logits), val.labels),
        domain_threshold=float(torch.quantile(scores, validation_pass_rate(len(scores)))),
    )
