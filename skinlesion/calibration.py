"""What an answer says besides its label: calibrated probabilities, whether the image looks like the
lesions the model was trained on, and the malignancy alert.

Probabilities: one temperature per predicted class (top-label calibration, Gupta & Ramdas 2022). The
class-weighted training loss makes the network underconfident when it says "nevus" and overconfident when it
names a rarer class, which one shared temperature cannot undo; dividing an image's logits by the temperature of
its own top class keeps that top class, so the label, accuracy and balanced accuracy are those of the raw network.

Everything here is fitted once per checkpoint (training/fitting.py, run by `python -m training.calibrate` and at the
end of training) on the lesion-grouped training and validation splits, stored in the checkpoint, and applied by
the Predictor to the forward pass it already makes: no second model on the request path. This module only applies.

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

from dataclasses import dataclass
from typing import Any

import torch

from skinlesion.image import IMAGENET_STD
from skinlesion.model import CLASS_CODES

# Malignant or pre-malignant: melanoma, basal cell carcinoma, actinic keratoses / intraepithelial carcinoma.
MALIGNANT_CODES = ("akiec", "bcc", "mel")
MALIGNANT_INDICES = [CLASS_CODES.index(code) for code in MALIGNANT_CODES]
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


def class_tempered_softmax(logits: torch.Tensor, temperatures: tuple[float, ...]) -> torch.Tensor:
    """softmax(logits / T_k) for each row, k its top class: the top class, and so the label, stays the same."""
    per_row = torch.tensor(temperatures, dtype=logits.dtype, device=logits.device)[logits.argmax(-1)]
    return (logits / per_row.unsqueeze(-1)).softmax(-1)


def malignant_probability(probabilities: torch.Tensor) -> torch.Tensor:
    return probabilities[..., MALIGNANT_INDICES].sum(-1)


def is_malignant(labels: torch.Tensor) -> torch.Tensor:
    return torch.isin(labels, torch.tensor(MALIGNANT_INDICES))


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
