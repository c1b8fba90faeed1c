"""The committed weights are real trained models: they load as served and beat the majority baseline."""

from __future__ import annotations

import numpy as np
import pytest

from skinlesion.model import ARCHITECTURES, DEFAULT_IMAGE_SIZE
from skinlesion.predictor import Predictor
from tests.conftest import HAM10000, ROOT
from training.data import TEST_FOLDER, read_samples
from training.evaluate import compute_metrics, predict_samples


@pytest.fixture(scope="module")
def test_samples():
    samples = [s for s in read_samples(HAM10000, require_images=False) if s.path and TEST_FOLDER in s.path.parts]
    return samples[::3]  # every third test image: about 500, seconds to score


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_shipped_weights_beat_the_majority_baseline_on_held_out_lesions(arch: str, test_samples) -> None:
    predictor = Predictor.from_checkpoint(ROOT / "model_store" / f"{arch}.pt")
    assert predictor.arch == arch and predictor.image_size == DEFAULT_IMAGE_SIZE
    metrics = compute_metrics(np.array([s.label for s in test_samples]), predict_samples(predictor, test_samples))
    # Majority class (nv) gives about 0.67 accuracy and 0.14 balanced accuracy on this split.
    assert metrics["accuracy"] > 0.72
    assert metrics["balanced_accuracy"] > 0.45
