"""The GPU path: TorchServe's GPU id picks each worker's device, and CUDA answers match the CPU's.

The CUDA tests run where torch sees a GPU (docs/performance.md, On a GPU, ran them on an H200) and are
skipped elsewhere; the device choice and the served workers' device are checked everywhere.
"""

from __future__ import annotations

import base64

import pytest
import requests
import torch
import yaml

from serving.skin_handler import worker_device
from skinlesion.image import decode_image
from skinlesion.predictor import Predictor
from tests.conftest import ROOT

HANDLER = ROOT / "serving"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this host")
# cuDNN convolutions use TF32 by default: probabilities agree to about 1e-3, not to float32's 1e-6.
CUDA_ATOL = 1e-2


def test_a_worker_uses_the_gpu_torchserve_hands_it_and_the_cpu_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert worker_device(0) == "cuda:0"
    assert worker_device("1") == "cuda:1"
    assert worker_device(None) == "cpu"  # TorchServe found no GPU, or the config says deviceType: cpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert worker_device(0) == "cpu"  # a GPU id but no usable CUDA (a CPU-only torch build)


def test_the_gpu_setting_changes_only_workers_and_batching() -> None:
    cpu = yaml.safe_load((HANDLER / "model-config.yaml").read_text())
    gpu = yaml.safe_load((HANDLER / "model-config-gpu.yaml").read_text())
    assert gpu["handler"] == cpu["handler"]  # explanations still leave for "skin-explain"
    assert gpu["minWorkers"] == gpu["maxWorkers"] > cpu["maxWorkers"] and gpu["batchSize"] == 1
    assert {k: v for k, v in gpu.items() if k not in ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay")} == \
        {k: v for k, v in cpu.items() if k not in ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay")}


@needs_cuda
def test_cuda_probabilities_match_the_cpu(checkpoints, fullres_images) -> None:
    photos = [decode_image(path.read_bytes()) for path in fullres_images[:16]]
    on_cpu = Predictor.from_checkpoint(checkpoints / "resnet34.pt")
    on_gpu = Predictor.from_checkpoint(checkpoints / "resnet34.pt", "cuda")
    inputs = torch.stack([on_cpu.preprocess(photo) for photo in photos])
    expected, got = on_cpu.probabilities(inputs), on_gpu.probabilities(inputs)
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, expected, atol=CUDA_ATOL, rtol=0)
    assert on_gpu.predict(photos[:1])[0]["prediction"] == on_cpu.predict(photos[:1])[0]["prediction"]


def test_served_workers_report_the_device_torchserve_gave_them(service) -> None:
    expected, other = ("cuda:0", "cpu") if torch.cuda.is_available() else ("cpu", "cuda")
    log = (service.run_dir / "torchserve" / "model_log.log").read_text()
    for arch in ("resnet18", "resnet34"):
        assert f"{arch} on {expected}" in log
        assert f"{arch} on {other}" not in log


@needs_cuda
def test_served_cuda_answers_match_the_cpu(service, checkpoints, fullres_images) -> None:
    photo = fullres_images[0].read_bytes()
    answer = requests.post(service.predict_url, json={"image": base64.b64encode(photo).decode()}, timeout=60).json()
    expected = Predictor.from_checkpoint(checkpoints / "resnet34.pt").predict([decode_image(photo)])[0]
    assert answer["success"] and answer["model"] == "resnet34"
    for name, p in expected["probabilities"].items():
        assert answer["probabilities"][name] == pytest.approx(p, abs=CUDA_ATOL)
