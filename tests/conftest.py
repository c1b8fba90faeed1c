"""Shared fixtures: random-weight checkpoints, built archives, and the real service on free ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from skinlesion.model import ARCHITECTURES, DEFAULT_IMAGE_SIZE, build_model, save_checkpoint
from skinlesion.predictor import Predictor

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("SKIN_DATA_DIR", ROOT.parent / "shared" / "data"))
FULLRES = DATA / "ham10000-fullres"
HAM10000 = DATA / "ham10000"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def fullres_images() -> list[Path]:
    images = sorted(FULLRES.glob("*.jpg"))
    if not images:
        pytest.fail(f"no full-size HAM10000 images under {FULLRES} (set SKIN_DATA_DIR)")
    return images


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random-weight (seeded) checkpoints for every architecture, in the shipped format."""
    folder = tmp_path_factory.mktemp("weights")
    for i, arch in enumerate(ARCHITECTURES):
        torch.manual_seed(i)
        save_checkpoint(build_model(arch), arch, DEFAULT_IMAGE_SIZE, folder / f"{arch}.pt")
    return folder


@pytest.fixture(scope="session")
def predictor(checkpoints: Path) -> Predictor:
    return Predictor.from_checkpoint(checkpoints / "resnet18.pt")


@pytest.fixture(scope="session")
def model_store(checkpoints: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("model_store")
    env = dict(os.environ, WEIGHTS_DIR=str(checkpoints), MODEL_STORE=str(store),
               ARCHIVER=str(Path(sys.executable).parent / "torch-model-archiver"))
    subprocess.run([str(ROOT / "archive.sh")], env=env, check=True, capture_output=True)
    return store


@dataclass
class Service:
    url: str
    management_url: str
    metrics_url: str
    inference_url: str
    run_dir: Path
    start_args: list[str]

    @property
    def predict_url(self) -> str:
        return f"{self.url}/predict"

    def start(self) -> None:
        subprocess.run([sys.executable, str(ROOT / "serve.py"), "start", *self.start_args], check=True,
                       capture_output=True, timeout=600)

    def stop(self) -> None:
        subprocess.run([sys.executable, str(ROOT / "serve.py"), "stop", "--run-dir", str(self.run_dir)],
                       check=True, capture_output=True, timeout=300)


@pytest.fixture(scope="session")
def service(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Service:
    """Real TorchServe (both versions, random weights) behind real nginx, on free loopback ports."""
    run_dir = tmp_path_factory.mktemp("run")
    ports = {name: free_port() for name in ("port", "inference-port", "management-port", "metrics-port")}
    grpc = free_port()
    args = ["--run-dir", str(run_dir), "--model-store", str(model_store), "--model", "resnet34", "--grpc-port", str(grpc)]
    for name, port in ports.items():
        args += [f"--{name}", str(port)]
    svc = Service(
        url=f"http://127.0.0.1:{ports['port']}",
        management_url=f"http://127.0.0.1:{ports['management-port']}",
        metrics_url=f"http://127.0.0.1:{ports['metrics-port']}",
        inference_url=f"http://127.0.0.1:{ports['inference-port']}",
        run_dir=run_dir,
        start_args=args,
    )
    svc.start()
    yield svc
    svc.stop()
