"""The model's and the explanations' choices, torch-free: the core validates requests against them, and the
clients (client.py, the page), the launcher and the benchmarks offer them without importing torch."""

from __future__ import annotations

# Explanation methods and LIME's precision levels (skinlesion.explain.PRECISION_SETTINGS has one entry each).
# "gradient" is the fast faithful one, the page's default (docs/explanations.md); the API's default stays LIME.
METHODS = ("lime", "gradcam", "gradient")
PRECISIONS = ("Low", "Medium", "High")
# Coverage levels a prediction set can be asked for (the share of lesions like the validation ones whose true class
# the set holds), and the one an answer carries unless asked.
COVERAGE_LEVELS = (0.8, 0.9, 0.95)
DEFAULT_COVERAGE = 0.9
# Model versions (skinlesion.model.ARCHITECTURES builds each).
ARCHITECTURE_NAMES = ("resnet18", "resnet34")
# Image formats the service decodes (Pillow's names; skinlesion.image opens only these), and the file suffixes the
# client and the training data loader take for them (tests/test_image.py checks the two agree).
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
