"""One home per setting: files that cannot read skinlesion.options or serving.settings repeat their values, and
these tests fail when a copy disagrees; the clients and the launcher stay torch-free; the benchmark scripts start as
bench/__init__.py says they run."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from serving import settings as service_settings
from serving.skin_handler import ADMISSION_PASS
from skinlesion import options
from skinlesion.explain import PRECISION_SETTINGS
from skinlesion.model import ARCHITECTURES
from tests.conftest import ROOT, properties


def test_the_core_builds_exactly_the_options() -> None:
    assert tuple(PRECISION_SETTINGS) == options.PRECISIONS
    assert tuple(ARCHITECTURES) == options.ARCHITECTURE_NAMES
    assert set(service_settings.EXPECTED_SECONDS) == {"predict", "gradcam", "gradient", *options.PRECISIONS}


def test_the_explanation_path_agrees_in_the_model_configs_and_nginx() -> None:
    for config in ("model-config.yaml", "model-config-gpu.yaml"):
        settings = yaml.safe_load((ROOT / "serving" / config).read_text())["handler"]
        assert settings["explanations_at"] == service_settings.EXPLAIN_PATH
    conf = (ROOT / "serving" / "nginx.conf").read_text()
    assert re.search(r"location @explained \{[^}]*rewrite \^ (\S+) break;", conf)[1] == service_settings.EXPLAIN_PATH
    # An explanation is admitted by the batching pool, /predict's own path, on the pass nginx marks as admission.
    batching_path = re.search(r"location = /predict \{.*?proxy_pass http://torchserve(\S+);", conf, re.S)[1]
    assert re.search(r"location @explain \{[^}]*rewrite \^ (\S+) break;", conf)[1] == batching_path
    marked = re.search(r"map \$uri \$explanation_admission \{\s*volatile;\s*(\S+) (\S+);\s*default \"\";", conf)
    assert (marked[1], marked[2]) == (batching_path, ADMISSION_PASS)


def test_archive_sh_builds_every_model_and_version() -> None:
    script = (ROOT / "archive.sh").read_text()
    assert f"for arch in {' '.join(options.ARCHITECTURE_NAMES)}; do" in script
    assert f"for model in {' '.join(service_settings.TORCHSERVE_MODELS)}; do" in script


def test_the_client_and_the_launcher_import_no_torch() -> None:
    for module in ("client", "serve"):
        code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
        assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0, f"{module} imports torch"


@pytest.mark.slow  # tens of seconds: ./test.sh quick leaves it out
def test_every_benchmark_starts_as_a_script_from_anywhere(tmp_path) -> None:
    scripts = sorted(p for p in (ROOT / "bench").rglob("*.py") if p.name != "__init__.py")
    runs = {script: subprocess.Popen([sys.executable, str(script), "--help"], cwd=tmp_path, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for script in scripts}
    for script, run in runs.items():
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0 and "usage:" in stdout, (script, stderr[-500:])


def test_the_ports_agree_with_config_properties_serve_sh_and_compose() -> None:
    ports = service_settings.DEFAULT_PORTS
    local = properties(ROOT / "config.properties")
    assert local["inference_address"] == f"http://127.0.0.1:{ports['inference']}"
    assert local["management_address"] == f"http://127.0.0.1:{ports['management']}"
    assert local["metrics_address"] == f"http://127.0.0.1:{ports['metrics']}"
    assert local["grpc_inference_port"] == str(ports["grpc"]) and local["grpc_management_port"] == str(ports["grpc"] + 1)
    assert f'PORT:-{ports["port"]}' in (ROOT / "serve.sh").read_text()
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert compose["proxy"]["environment"]["NGINX_LISTEN"] == str(ports["port"])
    assert compose["torchserve"]["expose"] == [str(ports["inference"])]


def test_timeouts_nest_from_the_deadline_out_to_the_client() -> None:
    """The explanation deadline < TorchServe's response timeout < nginx's read timeout <= the client's wait."""
    import client

    deadline = yaml.safe_load((ROOT / "serving" / "explain-config.yaml").read_text())["handler"]["deadline_seconds"]
    torchserve = int(properties(ROOT / "config.properties")["default_response_timeout"])
    for config in ("model-config.yaml", "model-config-gpu.yaml", "explain-config.yaml"):
        assert yaml.safe_load((ROOT / "serving" / config).read_text())["responseTimeout"] == torchserve
    nginx = int(re.search(r"proxy_read_timeout (\d+)s;", (ROOT / "serving" / "nginx.conf").read_text())[1])
    assert deadline < torchserve < nginx <= client.TIMEOUTS["explain"]


def test_the_body_limit_agrees_in_nginx_and_torchserve() -> None:
    conf = (ROOT / "serving" / "nginx.conf").read_text()
    mib = {int(n) for n in re.findall(r"client_(?:max_body|body_buffer)_size (\d+)m;", conf)}
    assert len(mib) == 1 and f"larger than {next(iter(mib))} MiB" in conf
    local = properties(ROOT / "config.properties")
    assert int(local["max_request_size"]) == int(local["max_response_size"]) == next(iter(mib)) * 2**20


def test_the_api_guide_names_the_coverage_levels() -> None:
    guide = (ROOT / "docs" / "api.md").read_text()
    request_row = re.search(r"\| `coverage` \| [^|]*: (.*) \| no \(`(.*)`\) \|", guide)
    assert re.findall(r"`([\d.]+)`", request_row[1]) == [str(level) for level in options.COVERAGE_LEVELS]
    assert request_row[2] == str(options.DEFAULT_COVERAGE)
    assert "`coverage` not one of " + ", ".join(map(str, options.COVERAGE_LEVELS)) in guide


def test_the_decoding_limits_in_the_settings_table_and_the_readme_are_the_code_s() -> None:
    from skinlesion import image

    def written(value: float) -> str:
        return f"{value:g} s" if isinstance(value, float) else f"{value:,}"

    names = ("MAX_IMAGE_PIXELS", "MAX_FULL_DECODE_PIXELS", "DECODED_MIN_SIDE", "MAX_JPEG_SCANS", "MAX_JPEG_SCAN_PIXELS",
             "MAX_SEGMENTS", "MAX_DECODE_CPU_SECONDS")
    [row] = [line for line in (ROOT / "docs" / "architecture.md").read_text().splitlines()
             if line.startswith("| decoding limits")]
    assert set(re.findall(r"`([A-Z_]+)` ", row)) == set(names), row
    for name in names:
        assert f"`{name}` {written(getattr(image, name))}" in row, name
    assert "`skinlesion/image.py`" in row
    [refused] = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| 400 |")]
    for wording in (f"over {image.MAX_JPEG_SCANS} scans", f"over {image.MAX_JPEG_SCAN_PIXELS:,} pixels",
                    f"over {image.MAX_SEGMENTS:,} segments", f"over {image.MAX_DECODE_CPU_SECONDS:g} s of CPU"):
        assert wording in refused, wording


def test_the_readme_s_429_row_gives_nginx_s_limits() -> None:
    conf = (ROOT / "serving" / "nginx.conf").read_text()
    per_client, everyone = (re.search(rf"limit_conn {zone} (\d+);", conf)[1] for zone in ("per_client", "everyone"))
    rate = re.search(r"zone=explanations:\S+ rate=(\d+)r/m;", conf)[1]
    [refused] = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| 429 |")]
    for wording in (f"more than {per_client} requests at once", f"{rate} explanations a minute",
                    f"more than {everyone} at once from all clients"):
        assert wording in refused, wording
