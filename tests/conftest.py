"""Shared fixtures: the shipped checkpoints and their archives, full-size photos, and the real service on free ports."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from serve import build_archives, free_port, free_ports, start_service, stop_service
from skinlesion.predictor import Predictor

ROOT = Path(__file__).resolve().parent.parent

# `./test.sh quick` leaves out what starts real servers (TorchServe, nginx, Streamlit, a browser), explains or
# scores hundreds of photos: the modules below, any test using these fixtures ("trained": tests/test_training.py's
# short training run), and the tests marked slow where they stand.
SLOW_FIXTURES = {"model_store", "service", "trained"}
SLOW_MODULES = {"test_budget", "test_deploy", "test_explain", "test_frontend", "test_full_size", "test_gpu",
                "test_integration", "test_kserve", "test_limits", "test_load_faults", "test_overload", "test_proxy",
                "test_security", "test_shipped_models"}
# Modules that start TorchServe instances of their own run first: before the session's service holds its eight
# workers' memory (about 8 GiB) beside theirs, which slowed their start by half on this 24 GiB machine.
OWN_TORCHSERVE_MODULES = ("test_deploy", "test_kserve", "test_overload")


def module_name(item: pytest.Item) -> str:
    return item.module.__name__.rsplit(".", 1)[-1]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: starts real servers, trains, or explains or scores hundreds of photos "
                            "(not in ./test.sh quick)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if module_name(item) in SLOW_MODULES or SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: module_name(item) not in OWN_TORCHSERVE_MODULES)  # stable: the rest keep their order


def properties(path: Path) -> dict[str, str]:
    """A Java .properties file (config.properties) as a dict."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


DATA = Path(os.environ.get("SKIN_DATA_DIR", ROOT.parent / "shared" / "data"))
FULLRES = DATA / "ham10000-fullres"
HAM10000 = DATA / "ham10000"


class ScriptedHandler(BaseHTTPRequestHandler):
    """Answers each GET or POST with the server's next (status, body[, headers]) from `answers`, repeating the last."""

    def answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        server = self.server
        status, body, *headers = server.answers[min(server.hits, len(server.answers) - 1)]
        server.hits += 1
        self.send_response(status)
        for name, value in (headers[0] if headers else {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = answer

    def log_message(self, *args) -> None:
        pass


@contextmanager
def http_stub(answers: list[tuple]) -> Iterator[ThreadingHTTPServer]:
    """A scripted HTTP server on a free loopback port: `.answers` (settable), `.hits`, `.url` (its /predict)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedHandler)
    server.answers, server.hits = list(answers), 0
    server.url = f"http://127.0.0.1:{server.server_address[1]}/predict"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def ramp_image(size: tuple[int, int] = (600, 450)) -> Image.Image:
    """A generated picture no lesion photo resembles, flagged out of domain by the input statistics alone (no second
    derivative anywhere), whatever the weights. Random noise is not: shrunk to the model's input it is a faintly
    grainy grey, which only trained features give away (tests/test_shipped_models.py)."""
    ramp = np.linspace(0.0, 1.0, size[0])[None, :, None] * np.array([40.0, 220.0, 90.0]) + np.array([200.0, 20.0, 120.0])
    return Image.fromarray(np.repeat(np.clip(ramp, 0, 255), size[1], axis=0).astype(np.uint8))


@pytest.fixture(scope="session")
def fullres_images() -> list[Path]:
    images = sorted(FULLRES.glob("*.jpg"))
    if not images:
        pytest.fail(f"no full-size HAM10000 images under {FULLRES} (set SKIN_DATA_DIR)")
    return images


@pytest.fixture(scope="session")
def original_photo(fullres_images: list[Path]) -> Path:
    """A full-size photo at its original quality (600x450, 250 KB): what a user's dermatoscope gives."""
    return next(path for path in fullres_images if path.name == "ISIC_0024313.jpg")


@pytest.fixture(scope="session")
def image_b64(fullres_images: list[Path]) -> str:
    """The first full-size photo, base64 as a /predict body carries it."""
    return base64.b64encode(fullres_images[0].read_bytes()).decode()


@pytest.fixture(scope="session")
def checkpoints() -> Path:
    """The folder of the shipped checkpoints (<arch>.pt), trained and calibrated as docs/training.md says: read only."""
    return ROOT / "model_store"


@pytest.fixture(scope="session")
def predictor(checkpoints: Path) -> Predictor:
    return Predictor.from_checkpoint(checkpoints / "resnet18.pt")


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The archives of the shipped weights, as `./serve.sh` builds them: what users are served."""
    store = tmp_path_factory.mktemp("model_store")
    build_archives(store, ROOT / "model_store")
    return store


def settings_copy(name: str, folder: Path, handler: dict | None = None, **settings) -> Path:
    """serving/<name> (a model's TorchServe settings) copied into `folder` with these settings, and these of its
    handler, changed."""
    config = yaml.safe_load((ROOT / "serving" / name).read_text()) | settings
    config["handler"] |= handler or {}
    (folder / name).write_text(yaml.safe_dump(config))
    return folder / name


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


@contextmanager
def own_service(folder: Path, weights_dir: Path, model_config: Path | None = None,
                explain_config: Path | None = None) -> Iterator[Service]:
    """A service of a test module's own: archives of the checkpoints in `weights_dir` built into `folder` with these
    TorchServe settings, TorchServe and nginx started on free ports with resnet34 as the default, stopped on exit."""
    store = folder / "model_store"
    build_archives(store, weights_dir, model_config, explain_config)
    run_dir = folder / "run"
    run_dir.mkdir()
    ports = free_ports()
    listen = f"127.0.0.1:{free_port(tuple(ports.values()))}"
    try:
        url, management = start_service(run_dir, store, ports, listen, "resnet34")
        yield Service(url, management, "", "", run_dir, [])
    finally:
        stop_service(run_dir)


@pytest.fixture(scope="session")
def service(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Service:
    """Real TorchServe (both versions of the shipped weights) behind real nginx, on free loopback ports."""
    run_dir = tmp_path_factory.mktemp("run")
    torchserve = free_ports()
    ports = {"port": free_port(tuple(torchserve.values())), **{f"{name}-port": port for name, port in torchserve.items()}}
    args = ["--run-dir", str(run_dir), "--model-store", str(model_store), "--model", "resnet34"]
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
    try:
        svc.start()
    except Exception:
        svc.stop()  # whatever part did start
        raise
    yield svc
    svc.stop()
