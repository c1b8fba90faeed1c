"""Security against the real servers: what listens where, what nginx lets through, which models can be
registered, and the request-size limits at their exact boundaries.

Registration is tested at both layers: the session's service (enable_model_api=false, as shipped) and a
second TorchServe on free ports with the same config.properties but TS_ENABLE_MODEL_API=true, so that
allowed_urls alone has to refuse. The http:// URLs point at a listener on loopback that counts requests.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import shutil
import subprocess
import sys
import urllib.parse
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
import requests

import serve
from tests.conftest import ROOT, http_stub

# nginx's client_max_body_size 21m and TorchServe's max_request_size, in bytes.
BODY_LIMIT = 21 * 1024 * 1024


def process_tree(pid_file: Path) -> set[int]:
    root = psutil.Process(int(pid_file.read_text()))
    return {root.pid, *(child.pid for child in root.children(recursive=True))}


def listening(pids: set[int]) -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids}


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # Java binds 127.0.0.1 as ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def port_of(url: str) -> int:
    return urllib.parse.urlsplit(url).port


def test_torchserve_listens_only_on_loopback_and_nginx_only_on_its_address(service) -> None:
    torchserve = listening(process_tree(service.run_dir / "tmp" / ".model_server.pid"))
    grpc = int(service.start_args[service.start_args.index("--grpc-port") + 1])
    expected = {port_of(service.inference_url), port_of(service.management_url), port_of(service.metrics_url), grpc, grpc + 1}
    # The Java frontend and its Python workers together: the five API ports and nothing else (workers
    # talk to the frontend over Unix sockets), every one on the loopback interface.
    assert {port for _, port in torchserve} == expected
    assert all(is_loopback(ip) for ip, _ in torchserve), torchserve
    assert listening(process_tree(service.run_dir / "nginx.pid")) == {("127.0.0.1", port_of(service.url))}


def raw_request(service, method: str, path: str) -> tuple[int, bytes]:
    """A request with the path exactly as given (requests and urllib3 would normalise dot segments)."""
    connection = http.client.HTTPConnection("127.0.0.1", port_of(service.url), timeout=30)
    try:
        connection.request(method, path, body=b"{}" if method == "POST" else None, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize("path", ["/predict/../models", "//models", "/predict/", "/PREDICT", "/health/../metrics",
                                  "/predict;/models", "/predict%2F..%2Fmodels", "/predictions/skin/resnet34",
                                  "/models/skin/resnet18/set-default", "/v1/models/skin:predict", "/v2/models/skin/infer"])
def test_path_variants_do_not_reach_torchserve(service, path: str) -> None:
    for method in ("GET", "POST", "PUT", "DELETE"):
        status, body = raw_request(service, method, path)
        assert status == 404, (method, path, status)
        assert json.loads(body)["success"] is False


def test_a_malformed_request_path_gets_the_envelope(service) -> None:
    status, body = raw_request(service, "GET", "/%2e%2e/models")
    assert status == 400
    assert body.startswith(b"{") and json.loads(body)["success"] is False


def body_of_size(size: int) -> bytes:
    """A JSON body of exactly `size` bytes: valid base64 of zero bytes (not an image), padded with spaces."""
    frame = b'{"image": ""}'
    b64_length = (size - len(frame)) // 4 * 4
    return b"{" + b" " * (size - len(frame) - b64_length) + b'"image": "' + b"A" * b64_length + b'"}'


def test_nginx_passes_a_body_of_exactly_21_mib_and_refuses_one_byte_more(service) -> None:
    at_limit = requests.post(service.predict_url, data=body_of_size(BODY_LIMIT), timeout=120)
    assert at_limit.status_code == 400 and "not a decodable image" in at_limit.json()["error"]  # the decoder's answer
    over = requests.post(service.predict_url, data=body_of_size(BODY_LIMIT + 1), timeout=120)
    assert over.status_code == 413 and over.json()["success"] is False


def test_torchserve_itself_has_the_same_limit_as_nginx(service) -> None:
    # Straight at TorchServe's inference port: its own max_request_size, not nginx's, decides here.
    url = f"{service.inference_url}/predictions/skin"
    at_limit = requests.post(url, data=body_of_size(BODY_LIMIT), headers={"Content-Type": "application/json"}, timeout=120)
    assert at_limit.status_code == 400 and "not a decodable image" in at_limit.json()["error"]
    over = requests.post(url, data=body_of_size(BODY_LIMIT + 1), headers={"Content-Type": "application/json"}, timeout=120)
    assert over.status_code == 413


@pytest.fixture(scope="module")
def listener() -> Iterator[ThreadingHTTPServer]:
    """An HTTP server on loopback that counts the requests it gets (a registration must never fetch)."""
    with http_stub([(404, b"")]) as server:
        yield server


@dataclass
class Outside:
    """An archive placed outside the model store, in every form a registration could name it."""

    file_url: str  # file:// URL of a .mar outside the store
    model_store_lookalike: str  # file:// URL of a .mar in some other folder named model_store
    directory: str  # a plain path to an unpacked archive outside the store
    http_url: str  # an http:// URL on the counting listener


@pytest.fixture(scope="module")
def outside(model_store: Path, tmp_path_factory: pytest.TempPathFactory, listener) -> Outside:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    archive = model_store / "skin-resnet18.mar"
    shutil.copy(archive, elsewhere / "intruder.mar")
    (elsewhere / "model_store").mkdir()
    shutil.copy(archive, elsewhere / "model_store" / "intruder.mar")
    with zipfile.ZipFile(archive) as packed:
        packed.extractall(elsewhere / "unpacked")
    return Outside(file_url=(elsewhere / "intruder.mar").as_uri(),
                   model_store_lookalike=(elsewhere / "model_store" / "intruder.mar").as_uri(),
                   directory=str(elsewhere / "unpacked"),
                   http_url=f"http://127.0.0.1:{listener.server_address[1]}/intruder.mar")


def register(management_url: str, url: str, name: str = "intruder") -> tuple[int, object]:
    query = urllib.parse.urlencode({"url": url, "model_name": name, "initial_workers": 0})
    return serve.http_json("POST", f"{management_url}/models?{query}", timeout=120)


def registered_models(management_url: str) -> list[str]:
    status, listing = serve.http_json("GET", f"{management_url}/models")
    assert status == 200
    return sorted(m["modelName"] for m in listing["models"])


def test_the_shipped_service_refuses_every_registration(service, outside: Outside, listener) -> None:
    before = registered_models(service.management_url)
    for url in (outside.file_url, outside.model_store_lookalike, outside.directory, outside.http_url, "skin-resnet18.mar"):
        status, answer = register(service.management_url, url)
        assert status == 405, (url, answer)  # enable_model_api=false: registering is not an allowed method
    assert registered_models(service.management_url) == before == sorted(serve.MODELS)
    assert listener.hits == 0


@pytest.fixture(scope="module")
def open_model_api(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A TorchServe with config.properties, its model API switched on, no models; its management URL."""
    run_dir = tmp_path_factory.mktemp("open-model-api")
    store = run_dir / "model_store"
    store.mkdir()
    shutil.copy(model_store / "skin-resnet18.mar", store)
    ports = serve.free_ports()
    env = serve.torchserve_env(run_dir, ports) | {"TS_ENABLE_MODEL_API": "true"}
    torchserve = str(Path(sys.executable).parent / "torchserve")
    management = f"http://127.0.0.1:{ports['management']}"
    try:
        # To a file, not a pipe: the Java server inherits the launcher's output and outlives it.
        with open(run_dir / "torchserve.out", "ab") as out:
            subprocess.run([torchserve, "--start", "--ncs", "--ts-config", str(ROOT / "config.properties"), "--model-store",
                            str(store)], env=env, cwd=run_dir, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=120)
        serve.wait_for(lambda: serve.http_json("GET", f"{management}/models")[0] == 200, "TorchServe's management API", 120)
        yield management
    finally:
        serve.stop_torchserve(run_dir)


def unregister_all(management_url: str) -> None:
    for name in registered_models(management_url):
        serve.http_json("DELETE", f"{management_url}/models/{name}", timeout=60)


def test_allowed_urls_refuses_urls_outside_the_store(open_model_api: str, outside: Outside, listener) -> None:
    try:
        # The control: a name in the store registers, so the refusals below are allowed_urls' doing.
        status, answer = register(open_model_api, "skin-resnet18.mar", "control")
        assert status == 200, answer
        # model_store_lookalike: a pattern such as file://.*/model_store/.* would admit it from anywhere.
        for url in (outside.file_url, outside.model_store_lookalike, outside.http_url):
            status, answer = register(open_model_api, url)
            assert status == 404 and "does not match any allowed URL" in answer["message"], (url, answer)
        status, answer = register(open_model_api, "../" + Path(outside.file_url).name)
        assert status == 404 and "Relative path is not allowed" in answer["message"]
        assert registered_models(open_model_api) == ["control"]
        assert listener.hits == 0
    finally:
        unregister_all(open_model_api)


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="TorchServe 0.12 applies allowed_urls to URLs only: a plain path to an unpacked model "
                   "directory registers whatever code it holds; only enable_model_api=false (and a loopback-only "
                   "management API) prevents it")
def test_allowed_urls_refuses_a_directory_outside_the_store(open_model_api: str, outside: Outside) -> None:
    try:
        status, answer = register(open_model_api, outside.directory)
        assert status == 404, answer
    finally:
        unregister_all(open_model_api)
