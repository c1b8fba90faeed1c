"""The calibrators training.calibrate compares, and how each is scored: out of fold on the validation lesions, and
over lesion-grouped resplits of the validation and test lesions. SHIPPED_CALIBRATOR is the one fitted into
checkpoints (training.fitting.fit_class_temperatures); the others are scored beside it so that the report shows
what it was chosen over.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, TypedDict

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from sklearn.metrics import balanced_accuracy_score

from skinlesion.calibration import class_tempered_softmax, is_malignant, malignant_probability
from training.data import lesion_folds
from training.evaluate import (
    calibration_error_floor,
    expected_calibration_error,
    macro_auc,
    malignant_calibration_error,
    one_vs_rest_aucs,
)
from training.fitting import CLASS_TEMPERATURE_PRIOR_IMAGES, fit_class_temperatures

if TYPE_CHECKING:  # training.reports imports this module for the figures' types
    from training.reports import CalibrationReport, EceFloor


# Lesion-grouped folds of the validation split for the out-of-fold calibration figures, dealt this many times
# (the figures are averaged over the deals: one deal's ECE moves by about 0.003 with its seed).
OUT_OF_FOLD_GROUPS = 5
OUT_OF_FOLD_DEALS = 20
# Lesion-grouped resplits of the validation and test lesions behind the spread of the test ECE.
RESPLITS = 200
# What the calibrated top-label ECE (15 bins) on the test split is held to.
ECE_TARGET = 0.03
# The draws of the resplits (the same every run, so a report's spread is reproducible).
RESPLIT_SEED = 0


class OutOfFold(TypedDict):
    """out_of_fold_calibration's figures; the scores are means over the deals."""
    folds: int
    deals: int
    nll: float
    ece: float
    accuracy: float
    balanced_accuracy: float
    macro_auc: float
    mean_confidence: float
    malignant_ece: float
    mean_malignant_probability: float
    ece_if_calibrated: EceFloor
    malignant_share: float


class Resplit(TypedDict):
    """resplit_calibration_error's figures."""
    draws: int
    mean: float
    p5: float
    p95: float
    share_at_target: float


# Fitted calibration: raw logits -> calibrated probabilities.
Calibrator = Callable[[torch.Tensor], torch.Tensor]


def nll(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    return float(torch.nn.functional.nll_loss(probabilities.clamp_min(1e-12).log(), labels))


def class_temperatures(logits: torch.Tensor, labels: torch.Tensor,
                       prior_images: float = CLASS_TEMPERATURE_PRIOR_IMAGES) -> Calibrator:
    """The shipped calibrator: logits -> softmax(logits / T_k), k the top class, each T_k fitted on the top-label
    loss of the images predicted k (training.fitting.fit_class_temperatures)."""
    temperatures = fit_class_temperatures(logits, labels, prior_images)
    return lambda x: class_tempered_softmax(x.double(), temperatures)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The one temperature T minimising the negative log-likelihood of softmax(logits / T)."""
    logits, labels = logits.double(), labels.long()

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits / np.exp(log_t), labels))

    return float(np.exp(minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded").x))


def temperature_scaling(logits: torch.Tensor, labels: torch.Tensor) -> Calibrator:
    """One temperature for every image (Guo et al. 2017), fitted by minimum NLL; shipped until per-class
    temperatures scored better out of fold."""
    temperature = fit_temperature(logits, labels)
    return lambda x: (x.double() / temperature).softmax(1)


def temperature_and_class_bias(logits: torch.Tensor, labels: torch.Tensor) -> Calibrator:
    """softmax(logits / T + b), T and one bias per class fitted by minimum NLL (bias-corrected temperature
    scaling, Alexandari et al. 2020). The bias can undo the lean towards the rarer classes that the
    class-weighted training loss gives the logits; it also moves the top label."""
    logits, labels = logits.double(), labels.long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(logits.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp() + bias, labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature, bias = float(log_t.detach().exp()), bias.detach()
    return lambda x: (x.double() / temperature + bias).softmax(1)


# Calibrators scored out of fold on the validation lesions; the first is the one fitted into checkpoints, the
# next two are its prior weight's neighbours.
CALIBRATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], Calibrator]] = {
    f"temperature per predicted class, prior {CLASS_TEMPERATURE_PRIOR_IMAGES}": class_temperatures,
    "temperature per predicted class, prior 10": functools.partial(class_temperatures, prior_images=10),
    "temperature per predicted class, prior 100": functools.partial(class_temperatures, prior_images=100),
    "one temperature": temperature_scaling,
    "one temperature and class bias": temperature_and_class_bias,
}

# The calibrator fitted into checkpoints, by the name its figures are reported under.
SHIPPED_CALIBRATOR = next(iter(CALIBRATORS))

# The out-of-fold figures the calibrator comparison tables show, in order.
CALIBRATOR_FIGURES = ("nll", "ece", "malignant_ece", "accuracy", "balanced_accuracy", "macro_auc")


def calibrators_scored(report: CalibrationReport) -> dict[str, OutOfFold]:
    """A calibration report's out-of-fold validation figures by calibrator, the shipped one first, marked so."""
    return {f"{SHIPPED_CALIBRATOR} (shipped)": report["validation_out_of_fold"],
            **report["validation_out_of_fold_alternatives"]}


def out_of_fold_probabilities(logits: torch.Tensor, labels: torch.Tensor, lesions: list[str], folds: int,
                              fit: Callable[[torch.Tensor, torch.Tensor], Calibrator], seed: int) -> torch.Tensor:
    """Each image's probabilities from the calibrator fitted on the other folds of one deal of the lesions."""
    groups = lesion_folds(lesions, folds, seed)
    probabilities = torch.empty(logits.shape, dtype=torch.float64)
    for group in range(folds):
        held_out = groups == group
        probabilities[held_out] = fit(logits[~held_out], labels[~held_out])(logits[held_out])
    return probabilities


def out_of_fold_calibration(logits: torch.Tensor, labels: torch.Tensor, lesions: list[str],
                            folds: int = OUT_OF_FOLD_GROUPS, fit: Callable[[torch.Tensor, torch.Tensor], Calibrator]
                            = class_temperatures, deals: int = OUT_OF_FOLD_DEALS) -> OutOfFold:
    """A calibrator scored on lesions it was not fitted on: the validation lesions dealt into `folds` groups (a
    lesion's images stay together), each scored with the calibrator fitted on the others; every figure is the
    average over `deals` deals. What the method gives new lesions like the validation ones, apart from any shift
    between validation and test lesions."""
    truth = labels.numpy()

    def scored(probabilities: torch.Tensor) -> dict:
        probs = probabilities.numpy()
        return {"nll": nll(probabilities, labels), "ece": expected_calibration_error(truth, probs),
                "accuracy": float((probs.argmax(1) == truth).mean()),
                "balanced_accuracy": float(balanced_accuracy_score(truth, probs.argmax(1))),
                "macro_auc": macro_auc(one_vs_rest_aucs(truth, probs)),
                "mean_confidence": float(probs.max(1).mean()),
                "malignant_ece": malignant_calibration_error(truth, probs),
                "mean_malignant_probability": float(malignant_probability(probabilities).mean())}

    runs = [out_of_fold_probabilities(logits, labels, lesions, folds, fit, seed) for seed in range(deals)]
    figures = [scored(p) for p in runs]
    return {"folds": folds, "deals": deals, **{key: float(np.mean([f[key] for f in figures])) for key in figures[0]},
            "ece_if_calibrated": calibration_error_floor(runs[0].numpy()),
            "malignant_share": float(is_malignant(labels).double().mean())}


def resplit_calibration_error(logits: torch.Tensor, labels: torch.Tensor, lesions: list[str], calibration_lesions: int,
                              fit: Callable[[torch.Tensor, torch.Tensor], Calibrator] = class_temperatures,
                              draws: int = RESPLITS) -> Resplit:
    """The top-label ECE a calibrator gives new lesions, over `draws` random lesion-grouped resplits of these
    images: fitted on `calibration_lesions` of the lesions, scored on the others. The test ECE is one such draw
    (fitted on the validation lesions, scored on the test lesions); this is how far the luck of the split alone
    moves it, and how often it meets ECE_TARGET."""
    names = np.array(lesions)
    rng = np.random.default_rng(RESPLIT_SEED)
    errors = []
    for _ in range(draws):
        fitted = torch.from_numpy(np.isin(names, rng.permutation(np.unique(names))[:calibration_lesions]))
        probabilities = fit(logits[fitted], labels[fitted])(logits[~fitted])
        errors.append(expected_calibration_error(labels[~fitted].numpy(), probabilities.numpy()))
    return {"draws": draws, "mean": float(np.mean(errors)), "p5": float(np.percentile(errors, 5)),
            "p95": float(np.percentile(errors, 95)), "share_at_target": float(np.mean(np.array(errors) <= ECE_TARGET))}


def shipped_resplit(report: CalibrationReport) -> Resplit:
    """A calibration report's resplit figures for the calibrator fitted into checkpoints."""
    return report["test_after"]["ece_resplits"][SHIPPED_CALIBRATOR]


def compare_out_of_fold(logits: torch.Tensor, labels: torch.Tensor, lesions: list[str],
                        deals: int = OUT_OF_FOLD_DEALS) -> tuple[OutOfFold, dict[str, OutOfFold]]:
    """Every calibrator scored out of fold on these (validation) images: the shipped one's figures, and the others'
    by name (a calibration report's validation_out_of_fold and validation_out_of_fold_alternatives)."""
    scored = {name: out_of_fold_calibration(logits, labels, lesions, fit=fit, deals=deals)
              for name, fit in CALIBRATORS.items()}
    return scored.pop(SHIPPED_CALIBRATOR), scored


def compare_resplits(logits: torch.Tensor, labels: torch.Tensor, lesions: list[str],
                     calibration_lesions: int, draws: int = RESPLITS) -> dict[str, Resplit]:
    """resplit_calibration_error of every calibrator, by name."""
    return {name: resplit_calibration_error(logits, labels, lesions, calibration_lesions, fit=fit, draws=draws)
            for name, fit in CALIBRATORS.items()}


def add_comparison_argument(parser: argparse.ArgumentParser) -> None:
    """The option of the training and calibration commands that sizes the comparison of calibrators (report only:
    what ships is fitted the same either way), as `args.comparison` = (resplits, deals)."""
    parser.add_argument("--comparison-draws", dest="comparison", type=int, nargs=2, default=(RESPLITS, OUT_OF_FOLD_DEALS),
                        metavar=("RESPLITS", "DEALS"),
                        help="lesion-grouped resplits behind the test ECE's spread and out-of-fold deals behind the "
                        "validation figures, for every calibrator compared (fewer: a quicker, noisier report)")

