"""Where the service listens and what it expects, torch-free: the launcher, the handler, the clients and the
benchmarks read these."""

from __future__ import annotations

# The TorchServe models every version (skinlesion.options.ARCHITECTURE_NAMES) serves: plain predictions (batched)
# and explanations (archive.sh builds one archive per model and version).
TORCHSERVE_MODELS = ("skin", "skin-explain")
EXPLAIN_PATH = "/predictions/skin-explain"
# The local run's ports: nginx's public one, then TorchServe's APIs (loopback only) and gRPC (and the next one).
# config.properties, serve.sh and docker-compose.yml repeat them (tests/test_settings.py compares).
DEFAULT_PORTS = {"port": 8089, "inference": 8080, "management": 8081, "metrics": 8082, "grpc": 7070}
DEFAULT_PREDICT_URL = f"http://127.0.0.1:{DEFAULT_PORTS['port']}/predict"
DEFAULT_MANAGEMENT_URL = f"http://127.0.0.1:{DEFAULT_PORTS['management']}"
# Seconds an explanation takes before the server has measured its own (serving.admission), and what the
# page tells a user to expect: bench/explain.py on the project's 2-core CPU, resnet34, one torch thread.
EXPECTED_SECONDS = {"predict": 0.1, "gradcam": 0.6, "gradient": 0.7, "Low": 2.0, "Medium": 6.4, "High": 19.0}
