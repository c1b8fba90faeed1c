"""What an answer says besides its label: calibrated probabilities, whether the image looks like the
lesions the model was trained on, and the malignancy alert.

Probabilities: one temperature per predicted class (top-label calibration, Gupta & Ramdas 2022). The
class-weighted training loss makes the network underconfident when it says "nevus" and overconfident when it
names a rarer class, which one shared temperature cannot undo; dividing an image's logits by the temperature of
its own top class keeps that top class, so the label, accuracy and balanced accuracy are those of the raw network.

Everything here is fitted once per checkpoint (`python -m training.calibrate`, also run at the end of
training) on the lesion-grouped training and validation splits, stored in the checkpoint, and applied by
the Predictor to the forward pass it already makes: no second model on the request path.

Out-of-domain score (chosen by `python -m training.calibrate`'s comparison, docs/training.md): two
Mahalanobis distances to the nearest class mean of the training lesions, with one shared covariance
(Ledoit-Wolf shrinkage), each as a z-score of its log against the validation lesions; the score is the
larger one. "input": colour statistics of the model input and the sharpness of its luminance at half and a quarter
of its resolution (what a blurred, flat or synthetic picture gives away, and the same for a lesion photographed at
200x150 or 4000x3000 pixels); "features": the pooled 512-d features before the classifier (what a photo
of something else gives away). Softmax confidence, max logit and energy scored near chance in that
comparison: the network is as confident on a rocket as on a mole.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from sklearn.covariance import LedoitWolf

from skinlesion.image import IMAGENET_STD
from skinlesion.model import CLASS_CODES

# Malignant or pre-malignant: melanoma, basal cell carcinoma, actinic keratoses / intraepithelial carcinoma.
MALIGNANT_CODES = ("akiec", "bcc", "mel")
MALIGNANT_INDICES = [CLASS_CODES.index(code) for code in MALIGNANT_CODES]
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
DOMAIN_SPACES = ("input", "features")
LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
# Keeps log() finite on a flat image (zero Laplacian).
SHARPNESS_FLOOR = 1e-3
# Sharpness is measured at half and a quarter of the model input's resolution, on luminance: at full resolution,
# and per colour channel, it shows where a photo came from rather than what it shows. A 600x450 photo shrunk
# straight to the input is sharper there than a 200x150 JPEG copy shrunk again, and its colour channels' fine
# detail differs by the copies' chroma subsampling; statistics fitted on the copies flagged 97% of the original
# full-size photos (docs/training.md, "A domain check for every photo size").
SHARPNESS_SCALES = (2, 4)
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# What input_statistics gives per image: four colour statistics of each channel, then the sharpness.
INPUT_STATISTICS = 4 * 3 + len(SHARPNESS_SCALES)


def input_statistics(inputs: torch.Tensor, sharpness_scales: tuple[int, ...] = SHARPNESS_SCALES,
                     luma: bool = True) -> torch.Tensor:
    """N x (12 + scales) statistics of normalized model inputs (N x 3 x H x W): per channel the mean and standard
    deviation, and the mean of the central quarter of the picture minus the mean of the rest and its standard
    deviation (HAM10000 photos are centred on the lesion); then the log mean absolute Laplacian of the luminance
    (sharpness) at each of `sharpness_scales` (average-pooled by that factor). `luma=False` measures sharpness per
    colour channel, as the check did before (one of training.calibrate's compared candidates)."""
    inputs = inputs.float()
    height, width = inputs.shape[-2:]
    centre = torch.zeros(height, width, dtype=torch.bool, device=inputs.device)
    centre[height // 4 : height - height // 4, width // 4 : width - width // 4] = True
    centre_mean, rest_mean = inputs[..., centre].mean(-1), inputs[..., ~centre].mean(-1)
    colour = [inputs.mean((2, 3)), inputs.std((2, 3)), centre_mean - rest_mean, inputs[..., centre].std(-1)]
    std = torch.tensor(IMAGENET_STD, device=inputs.device)[:, None, None]
    weights = torch.tensor(LUMA_WEIGHTS, device=inputs.device)[:, None, None]
    # Luminance of the pixels themselves (the normalization shifts each channel differently).
    detail = (inputs * std * weights).sum(1, keepdim=True) if luma else inputs
    channels = detail.shape[1]
    laplacian = LAPLACIAN.to(inputs.device).expand(channels, 1, 3, 3)
    sharpness = [(torch.nn.functional.conv2d(torch.nn.functional.avg_pool2d(detail, scale) if scale > 1 else detail,
                                             laplacian, groups=channels).abs().mean((2, 3)) + SHARPNESS_FLOOR).log()
                 for scale in sharpness_scales]
    return torch.cat(colour + sharpness, dim=1)


@dataclass(frozen=True)
class ClassGaussians:
    """Class means with one shared precision matrix, and the log-distance scale of validation lesions."""

    means: torch.Tensor  # K x D (classes present in training)
    precision: torch.Tensor  # D x D
    log_mean: float
    log_std: float

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance of each row of `x` (N x D) to its nearest class mean."""
        diff = x.float()[:, None, :] - self.means[None]
        return torch.einsum("nkd,de,nke->nk", diff, self.precision, diff).min(dim=1).values

    def zscores(self, x: torch.Tensor) -> torch.Tensor:
        return (self.distances(x).clamp_min(1e-12).log() - self.log_mean) / self.log_std


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


def class_tempered_softmax(logits: torch.Tensor, temperatures: tuple[float, ...]) -> torch.Tensor:
    """softmax(logits / T_k) for each row, k its top class: the top class, and so the label, stays the same."""
    per_row = torch.tensor(temperatures, dtype=logits.dtype, device=logits.device)[logits.argmax(-1)]
    return (logits / per_row.unsqueeze(-1)).softmax(-1)


def validation_pass_rate(n: int) -> float:
    """The share of n validation lesions the threshold lets through, so that at least IN_DOMAIN_PASS_RATE of
    new lesions pass with 95% confidence (0.961 for this project's 997 validation images)."""
    p = IN_DOMAIN_PASS_RATE
    return min(1.0, p + PASS_RATE_MARGIN_SE * float(np.sqrt(p * (1 - p) / max(n, 1))))


def malignant_probability(probabilities: torch.Tensor) -> torch.Tensor:
    return probabilities[..., MALIGNANT_INDICES].sum(-1)


def is_malignant(labels: torch.Tensor) -> torch.Tensor:
    return torch.isin(labels, torch.tensor(MALIGNANT_INDICES))


def fit_malignancy_threshold(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    """The highest threshold on P(malignant) whose sensitivity on these lesions is at least MALIGNANCY_SENSITIVITY."""
    scores = malignant_probability(probabilities)[is_malignant(labels)].sort(descending=True).values
    if len(scores) == 0:
        return 0.5
    needed = int(np.ceil(MALIGNANCY_SENSITIVITY * len(scores)))
    return float(scores[needed - 1])


# Nonconformity scores a prediction set can be built from (training/conformal.py chooses one on validation
# lesions): "lac", 1 - p(class); "aps", the probability of the classes at least as probable as this one, itself
# included (adaptive prediction sets); "raps", aps plus RAPS_PENALTY per rank past RAPS_FREE_RANKS. None is
# randomised: a photo sent twice gets the same set.
SET_SCORES = ("lac", "aps", "raps")
RAPS_PENALTY, RAPS_FREE_RANKS = 0.1, 1


def set_scores(probabilities: torch.Tensor, score: str) -> torch.Tensor:
    """N x K nonconformity of each class for each image (higher = less plausible)."""
    probabilities = probabilities.double()
    if score == "lac":
        return 1 - probabilities
    order = probabilities.argsort(dim=-1, descending=True, stable=True)
    ranks = order.argsort(dim=-1)  # 0 for the most probable class
    cumulative = probabilities.gather(-1, order).cumsum(-1).gather(-1, ranks)
    if score == "aps":
        return cumulative
    if score == "raps":
        return cumulative + RAPS_PENALTY * (ranks + 1 - RAPS_FREE_RANKS).clamp_min(0)
    raise ValueError(f"unknown set score {score!r}; one of {', '.join(SET_SCORES)}")


def prediction_sets(probabilities: torch.Tensor, score: str, thresholds: torch.Tensor | tuple[float, ...]) -> torch.Tensor:
    """N x K: whether each class is in each image's set, i.e. its score is within its class's threshold. The most
    probable class always is: an empty set would say no diagnosis fits, which no score here can tell."""
    thresholds = torch.as_tensor(thresholds, dtype=torch.float64)
    members = set_scores(probabilities, score) <= thresholds
    return members | torch.nn.functional.one_hot(probabilities.argmax(-1), probabilities.shape[-1]).bool()


@dataclass(frozen=True)
class SetFit:
    """Prediction sets fitted for each coverage level (skinlesion.options.COVERAGE_LEVELS): the score, and per level
    one threshold per class (CLASS_CODES order; inf where the class is always in the set)."""

    score: str
    thresholds: dict[float, tuple[float, ...]]

    def members(self, probabilities: torch.Tensor, level: float) -> torch.Tensor:
        return prediction_sets(probabilities, self.score, self.thresholds[level])


@dataclass(frozen=True)
class Calibration:
    # One per class (CLASS_CODES order), applied to the images predicted that class.
    temperatures: tuple[float, ...]
    malignancy_threshold: float
    domain: dict[str, ClassGaussians]
    # An image whose domain score is above this is out of domain.
    domain_threshold: float
    # The inference the fit was made for, which plain predictions then use: test-time views
    # (skinlesion.image.TTA_VIEWS) and a bfloat16 trunk.
    views: str = "none"
    bfloat16: bool = False
    # Conformal prediction sets (training/conformal.py); None for a checkpoint calibrated before they existed.
    sets: SetFit | None = None

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return class_tempered_softmax(logits, self.temperatures)

    def domain_score(self, statistics: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Per image, the larger of the two z-scores; higher = less like the training lesions."""
        return torch.maximum(self.domain["input"].zscores(statistics), self.domain["features"].zscores(features))

    def to_state(self) -> dict[str, Any]:
        """Plain tensors, floats and dicts: what torch.load(weights_only=True) reads back."""
        return {
            "temperatures": list(self.temperatures),
            "malignancy_threshold": self.malignancy_threshold,
            "domain_threshold": self.domain_threshold,
            "domain": {name: vars(g) for name, g in self.domain.items()},
            "views": self.views,
            "bfloat16": self.bfloat16,
            "sets": None if self.sets is None else {
                "score": self.sets.score,
                "thresholds": {str(level): list(t) for level, t in self.sets.thresholds.items()}},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Calibration:
        # A checkpoint calibrated before temperatures were per class holds one shared temperature.
        temperatures = state.get("temperatures") or [state["temperature"]] * len(CLASS_CODES)
        domain = {name: ClassGaussians(**g) for name, g in state["domain"].items()}
        statistics = domain["input"].means.shape[1]
        if statistics != INPUT_STATISTICS:
            raise ValueError(f"this checkpoint's out-of-domain check reads {statistics} input statistics, this version "
                             f"computes {INPUT_STATISTICS}: calibrate it again (python -m training.calibrate)")
        return cls(
            temperatures=tuple(float(t) for t in temperatures),
            malignancy_threshold=float(state["malignancy_threshold"]),
            domain_threshold=float(state["domain_threshold"]),
            domain=domain,
            views=state.get("views", "none"),
            bfloat16=bool(state.get("bfloat16", False)),
            sets=SetFit(state["sets"]["score"], {float(level): tuple(float(t) for t in thresholds)
                                                for level, thresholds in state["sets"]["thresholds"].items()})
            if state.get("sets") else None,
        )


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
