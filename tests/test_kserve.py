"""deploy/kserve: the InferenceService's TorchServe command on the storage layout it names, with the KServe v1
envelope that KServe's TorchServe runtime sets for protocolVersion v1, answering real v1 requests here.

What differs from the pod: free loopback ports (TorchServe's TS_*_ADDRESS variables, as enable_envvars_config
allows) and a temporary folder in place of /mnt/models.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml

import serve
from serving.service import MAX_EXPLANATIONS_PER_REQUEST, MAX_INSTANCES
from skinlesion.model import ARCHITECTURES, CLASS_NAMES
from tests.conftest import ROOT, properties

KSERVE = ROOT / "deploy" / "kserve"
MOUNT = "/mnt/models"  # where KServe's storage initializer puts storageUri
# Keys that differ from the repository's config.properties on purpose (the file's comments say why).
KSERVE_ONLY = {"inference_address", "allowed_urls", "model_store", "model_snapshot"}


def predictor() -> dict:
    return yaml.safe_load((KSERVE / "inferenceservice.yaml").read_text())["spec"]["predictor"]["model"]


def test_inference_service_uses_the_torchserve_runtime_with_v1() -> None:
    model = predictor()
    assert model["modelFormat"]["name"] == "pytorch" and model["protocolVersion"] == "v1"
    assert model["storageUri"]
    assert f"--model-store={MOUNT}/model-store" in model["args"]
    assert f"--ts-config={MOUNT}/config/config.properties" in model["args"]


def test_the_pod_is_probed_limited_and_writes_its_temp_folder_to_a_volume() -> None:
    spec = yaml.safe_load((KSERVE / "inferenceservice.yaml").read_text())["spec"]["predictor"]
    model = spec["model"]
    assert model["livenessProbe"]["httpGet"]["path"] == "/ping" and model["livenessProbe"]["initialDelaySeconds"] >= 180
    assert {"cpu", "memory"} <= set(model["resources"]["limits"])
    # The explanation ledger (serving.admission.default_ledger_path) and the unpacked archives live in TMPDIR.
    [mount] = [m for m in model["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert [v for v in spec["volumes"] if v["name"] == mount["name"]] == [{"name": mount["name"],
                                                                        "emptyDir": {"sizeLimit": "1Gi"}}]


def test_kserve_config_keeps_the_local_settings() -> None:
    local, kserve = properties(ROOT / "config.properties"), properties(KSERVE / "config" / "config.properties")
    shared = {key: value for key, value in local.items() if key not in KSERVE_ONLY}
    assert {key: kserve.get(key) for key in shared} == shared
    assert kserve["enable_envvars_config"] == "true" and kserve["model_store"] == f"{MOUNT}/model-store"


@dataclass
class KServeTorchServe:
    predict_url: str


@pytest.fixture(scope="module")
def kserve_torchserve(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KServeTorchServe]:
    storage = tmp_path_factory.mktemp("storage")
    shutil.copytree(KSERVE / "config", storage / "config")
    (storage / "model-store").mkdir()
    for arch in ARCHITECTURES:  # copied, as the storage initializer does: the real path must say model-store
        shutil.copy(model_store / f"skin-{arch}.mar", storage / "model-store")
    args = [arg.replace(MOUNT, str(storage)) for arg in predictor()["args"]]
    args[0] = str(Path(sys.executable).parent / args[0])
    run_dir = tmp_path_factory.mktemp("kserve-run")
    ports = serve.free_ports()
    env = serve.torchserve_env(run_dir, ports) | {"TS_SERVICE_ENVELOPE": "kserve"}
    del env["PYTHONPATH"]  # the pod has no checkout: the archives must carry the code they import
    with open(run_dir / "torchserve.log", "wb") as log:
        process = subprocess.Popen(args, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        management = f"http://127.0.0.1:{ports['management']}"

        def ready() -> bool:
            assert process.poll() is None, (run_dir / "torchserve.log").read_text()[-3000:]
            return serve.versions_ready(management, ("skin",))

        serve.wait_for(ready, "TorchServe from the KServe storage layout", 300)
        yield KServeTorchServe(f"http://127.0.0.1:{ports['inference']}/v1/models/skin:predict")
    finally:
        serve.stop_torchserve(run_dir)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_v1_instance_gets_predictions_from_the_default_version(kserve_torchserve: KServeTorchServe, image_b64: str) -> None:
    instances = [{"image": image_b64}, {"image": image_b64, "coverage": 0.95}]
    response = requests.post(kserve_torchserve.predict_url, json={"instances": instances}, timeout=120)
    assert response.status_code == 200, response.text[:300]
    answer, wider = response.json()["predictions"]
    assert answer["success"] is True and answer["model"] == "resnet34"  # defaultVersion in model_snapshot
    assert answer["prediction"] in CLASS_NAMES and list(answer["probabilities"]) == list(CLASS_NAMES)
    # The prediction set, at each instance's own coverage, as /predict answers it.
    assert answer["set_coverage"] == 0.9 and wider["set_coverage"] == 0.95
    assert answer["prediction_set"][0] == answer["prediction"] and set(answer["prediction_set"]) <= set(wider["prediction_set"])


def test_each_instance_gets_its_own_answer(kserve_torchserve: KServeTorchServe, image_b64: str) -> None:
    # 200 as one instance succeeded: a non-200 answer would lose the ~5 MB explanation to TorchServe's reset.
    instances = [{"image": image_b64}, {"image": "%%%"},
                 {"image": image_b64, "method": "gradient", "explain": True, "explain_class": "Melanoma"}]
    response = requests.post(kserve_torchserve.predict_url, json={"instances": instances}, timeout=180)
    assert response.status_code == 200
    good, bad, explained = response.json()["predictions"]
    assert good["success"] is True and explained["explanation"]["method"] == "gradient"
    # The class asked for is explained, and the self-check is about it (the same request contract as /predict).
    assert explained["explanation"]["label"] == "Melanoma"
    assert explained["explanation"]["check"]["probability"] == explained["probabilities"]["Melanoma"]
    assert bad == {"success": False, "error": "'image' is not valid base64"}


def test_a_failing_lone_instance_gets_its_predict_status(kserve_torchserve: KServeTorchServe) -> None:
    response = requests.post(kserve_torchserve.predict_url, json={"instances": [{"image": "%%%"}]}, timeout=60)
    assert response.status_code == 400
    assert response.json() == {"predictions": [{"success": False, "error": "'image' is not valid base64"}]}


@pytest.mark.parametrize("body", [{"image": "plain /predict body"}, {"instances": []}])
def test_a_body_without_instances_gets_400_saying_what_to_send(kserve_torchserve: KServeTorchServe, body: dict) -> None:
    response = requests.post(kserve_torchserve.predict_url, json=body, timeout=60)
    assert response.status_code == 400
    [answer] = response.json()["predictions"]
    assert answer["success"] is False and '"instances"' in answer["error"]



@pytest.mark.parametrize(("count", "explaining", "message"), [
    (MAX_INSTANCES + 1, 0, f"at most {MAX_INSTANCES} are accepted"),
    (2, 2, f"at most {MAX_EXPLANATIONS_PER_REQUEST} per request"),
])
def test_instances_over_the_caps_get_400_saying_the_limit(kserve_torchserve: KServeTorchServe, image_b64: str,
                                                          count: int, explaining: int, message: str) -> None:
    instances = [{"image": image_b64, "explain": i < explaining, "method": "gradcam"} for i in range(count)]
    response = requests.post(kserve_torchserve.predict_url, json={"instances": instances}, timeout=60)
    assert response.status_code == 400
    [answer] = response.json()["predictions"]
    assert answer["success"] is False and message in answer["error"]


def test_instances_at_the_cap_are_all_answered(kserve_torchserve: KServeTorchServe, image_b64: str) -> None:
    instances = [{"image": image_b64}] * MAX_INSTANCES
    response = requests.post(kserve_torchserve.predict_url, json={"instances": instances}, timeout=120)
    assert response.status_code == 200
    assert [p["success"] for p in response.json()["predictions"]] == [True] * MAX_INSTANCES
