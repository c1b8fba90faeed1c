"""The service's choices, torch-free: the core validates requests against them, and the clients (client.py,
the page), the launcher and the benchmarks offer them without importing torch."""

from __future__ import annotations

# Explanation methods and LIME's precision levels (skinlesion.explain.PRECISION_SETTINGS has one entry each).
# "gradient" is the fast faithful one, the page's default (docs/explanations.md); the API's default stays LIME.
METHODS = ("lime", "gradcam", "gradient")
PRECISIONS = ("Low", "Medium", "High")
# Coverage levels a prediction set can be asked for (the share of lesions like the validation ones whose true class
# the set holds), and the one an answer carries unless asked.
COVERAGE_LEVELS = (0.8, 0.9, 0.95)
DEFAULT_COVERAGE = 0.9
# Model versions (skinlesion.model.ARCHITECTURES builds each) and the TorchServe models every version serves:
# plain predictions (batched) and explanations (archive.sh builds one archive per model and version).
ARCHITECTURE_NAMES = ("resnet18", "resnet34")
TORCHSERVE_MODELS = ("skin", "skin-explain")
EXPLAIN_PATH = "/predictions/skin-explain"
# The local run's ports: nginx's public one, then TorchServe's APIs (loopback only) and gRPC (and the next one).
# config.properties, serve.sh and docker-compose.yml repeat them (tests/test_settings.py compares).
DEFAULT_PORTS = {"port": 8089, "inference": 8080, "management": 8081, "metrics": 8082, "grpc": 7070}
DEFAULT_PREDICT_URL = f"http://127.0.0.1:{DEFAULT_PORTS['port']}/predict"
DEFAULT_MANAGEMENT_URL = f"http://127.0.0.1:{DEFAULT_PORTS['management']}"
# Seconds an explanation takes before the server has measured its own (skinlesion.admission), and what the
# page tells a user to expect: bench/explain.py on the project's 2-core CPU, resnet34, one torch thread.
EXPECTED_SECONDS = {"predict": 0.1, "gradcam": 0.6, "gradient": 0.7, "Low": 2.0, "Medium": 6.4, "High": 19.0}
