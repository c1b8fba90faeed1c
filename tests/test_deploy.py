"""docker-compose.yml, the Dockerfile and scale-out, checked without a Docker engine.

The compose file validates against the Compose Specification schema; the proxy's nginx.conf, rendered as the
nginx image's envsubst renders it, is what serve.py renders and passes `nginx -t`; the Dockerfile copies files
that exist; and the containers' commands run here: two TorchServe instances started with the torchserve
service's command behind one nginx keep answering while one of them is stopped under load, and the frontend
service's command starts Streamlit.

tests/data/compose-spec.json is compose/config/compose_spec.json from the docker-compose 1.29.2 wheel on
PyPI (`pip download --no-deps docker-compose==1.29.2`; wheel sha256 8d5589373b35c8d3b1c8c1182c6e4a4ff14
bffa3dd0b605fcd08f73c94cef809), copied unchanged (sha256 0dc04bd346dcfee1b1419628fff79937bbf076925f298f2
72a2b490e2b112bac).
"""

from __future__ import annotations

import base64
import fnmatch
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
import requests
import yaml

import serve
from serving.proxy import render_nginx_conf
from skinlesion.model import ARCHITECTURES
from tests.conftest import ROOT, settings_copy

COMPOSE_FILE = ROOT / "docker-compose.yml"
SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
# What the nginx image defines besides the service's environment: envsubst replaces these names too.
NGINX_IMAGE_ENV = ("PATH", "HOSTNAME", "HOME", "NGINX_VERSION", "NJS_VERSION", "NJS_RELEASE", "PKG_RELEASE", "DYNPKG_RELEASE")
STARTUP_SECONDS = 300  # two TorchServe instances loading their workers on a busy two-core machine
# Workers per model version in each scaled-out instance: what is under test is nginx over two instances, and one
# worker each (4 an instance, not 8) halves their start on two cores.
INSTANCE_WORKERS = 1
LOAD_THREADS = 3
LOAD_SECONDS = 8  # before the stop, and again after it


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR} and ${VAR:-default} interpolation (the forms this file uses)."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m[1]) or m[2] or "", text)


def load_compose(env: dict[str, str] | None = None) -> dict:
    return yaml.safe_load(interpolate(COMPOSE_FILE.read_text(), env or {}))


def local_command(command: list[str]) -> list[str]:
    """A container command as run here: this venv's interpreter and scripts, the loopback interface only."""
    executables = {"python": sys.executable, "streamlit": str(Path(sys.executable).parent / "streamlit")}
    return [executables.get(command[0], command[0])] + ["127.0.0.1" if arg == "0.0.0.0" else arg for arg in command[1:]]


def test_compose_file_follows_the_compose_specification() -> None:
    schema = json.loads(SCHEMA.read_text())
    # Named explicitly: jsonschema does not recognise the file's spelling of the draft 2019-09 URI.
    validator = jsonschema.Draft201909Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(load_compose())]
    assert not errors, errors
    # Any service name validates, so a misspelt one would pass as a fourth service.
    assert set(load_compose()["services"]) == {"torchserve", "proxy", "frontend"}


def test_compose_publishes_only_the_proxy_and_the_page() -> None:
    services = load_compose()["services"]
    assert "ports" not in services["torchserve"]
    # On the host's loopback interface unless the file is changed to publish them.
    assert services["proxy"]["ports"] == ["127.0.0.1:8089:8089"] and services["frontend"]["ports"] == ["127.0.0.1:8501:8501"]
    assert all({"cpus", "memory"} <= set(service["deploy"]["resources"]["limits"]) for service in services.values())
    assert services["torchserve"]["deploy"]["replicas"] >= 2
    assert all("test" in service["healthcheck"] for service in services.values())
    assert services["proxy"]["depends_on"]["torchserve"]["condition"] == "service_healthy"
    # The page reaches nginx on its own port, which is not published: only there does nginx take its word for its user.
    page_port = services["proxy"]["environment"]["NGINX_PAGE_PORT"]
    assert services["frontend"]["environment"]["SKIN_API_URL"] == f"http://proxy:{page_port}/predict"
    assert not any(port.endswith(f":{page_port}") for port in services["proxy"]["ports"])
    assert services["proxy"]["volumes"] == ["./serving/nginx.conf:/etc/nginx/templates/nginx.conf.template:ro"]
    assert load_compose({"MODEL": "resnet18"})["services"]["torchserve"]["environment"]["MODEL"] == "resnet18"
    assert load_compose()["services"]["torchserve"]["environment"]["MODEL"] == "resnet34"


def render_as_nginx_image(template: Path, environment: dict[str, str]) -> str:
    """What the nginx image's 20-envsubst-on-templates.sh writes: envsubst restricted to the names defined
    in the container, so nginx's own $variables survive."""
    env = {name: "" for name in NGINX_IMAGE_ENV} | environment
    shell_format = " ".join(f"${{{name}}}" for name in env)
    envsubst = shutil.which("envsubst") or "/usr/bin/envsubst"
    return subprocess.run([envsubst, shell_format], input=template.read_text(), env=env, capture_output=True, text=True,
                          check=True).stdout


def test_proxy_config_is_the_local_template_and_passes_nginx_t(tmp_path: Path) -> None:
    proxy = load_compose()["services"]["proxy"]
    environment = {name: str(value) for name, value in proxy["environment"].items()}
    assert environment["NGINX_ENVSUBST_OUTPUT_DIR"] == "/etc/nginx"  # the template becomes /etc/nginx/nginx.conf
    rendered = render_as_nginx_image(ROOT / "serving" / "nginx.conf", environment)
    upstream = re.fullmatch(r"server (\S+) max_fails=1 fail_timeout=5s;", environment["TORCHSERVE_SERVERS"])
    assert upstream, environment["TORCHSERVE_SERVERS"]
    page_listen = re.fullmatch(r"listen (\d+);", environment["NGINX_PAGE_LISTEN"])[1]
    assert rendered == render_nginx_conf(environment["NGINX_LISTEN"], [upstream[1]], Path(environment["NGINX_RUN_DIR"]),
                                               Path(environment["NGINX_LOG_DIR"]), environment["NGINX_USER"], page_listen)
    assert "$request_method" in rendered and not re.findall(r"^[^#]*\$\{", rendered, re.MULTILINE)

    # nginx -t with the container's paths, names and user: a private mount namespace gets a tmpfs /var with the
    # image's folders, an /etc/hosts where the compose service names resolve, and the image's nginx user (101).
    conf = tmp_path / "nginx.conf"
    conf.write_text(rendered)
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost " + " ".join(load_compose()["services"]) + "\n")
    user = environment["NGINX_USER"]
    (tmp_path / "passwd").write_text(Path("/etc/passwd").read_text() + f"{user}:x:101:101::/nonexistent:/bin/false\n")
    (tmp_path / "group").write_text(Path("/etc/group").read_text() + f"{user}:x:101:\n")
    folders = " ".join({environment["NGINX_RUN_DIR"], environment["NGINX_LOG_DIR"]})
    accounts = " && ".join(f"mount --bind {tmp_path / name} /etc/{name}" for name in ("hosts", "passwd", "group"))
    script = f"mount -t tmpfs tmpfs /var && mkdir -p {folders} && {accounts} && exec nginx -t -c {conf}"
    unshare = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        unshare.insert(1, "--map-root-user")
    probe = subprocess.run([*unshare, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"nginx -t needs a private mount namespace here: {probe.stderr.strip()}")
    nginx_dir = str(Path(shutil.which("nginx") or "/usr/sbin/nginx").parent)
    result = subprocess.run([*unshare, "sh", "-c", script], capture_output=True, text=True,
                            env=dict(os.environ, PATH=f"{nginx_dir}:{os.environ['PATH']}"))
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves `path`, or a folder above it, out of the build context."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(any(fnmatch.fnmatch(part, pattern[3:]) for part in parts) if pattern.startswith("**/")  # any depth
               else any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes) for pattern in patterns)


def test_dockerfile_copies_files_that_exist_and_are_in_the_build_context() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copies = [line.split()[1:] for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")]
    sources = [source.rstrip("/") for *sources, _ in copies for source in sources if not source.startswith("--")]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which is missing"
        assert not dockerignored(source, patterns), f"the Dockerfile copies {source}, which .dockerignore leaves out"
    # archive.sh in the image turns exactly these into the archives that serve.py loads.
    assert {s for s in sources if s.endswith(".pt")} == {f"model_store/{arch}.pt" for arch in ARCHITECTURES}
    # The container runs serve.py torchserve: every file of the project its command line names is in the image.
    named = {Path(arg).name for arg in serve.torchserve_command(ROOT / "model_store")
             if Path(arg).parent == ROOT and Path(arg).is_file()}
    assert named == {"config.properties", "log4j2.xml"} and named <= set(sources)
    assert dockerignored(".venv/bin/python", patterns) and dockerignored("skinlesion/__pycache__/x.pyc", patterns)


def test_frontend_service_command_starts_the_page(tmp_path: Path) -> None:
    service = load_compose()["services"]["frontend"]
    command = local_command(service["command"])
    command[command.index("--server.port") + 1] = str(port := serve.free_port())
    with open(tmp_path / "streamlit.log", "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, **service["environment"]), stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        def healthy() -> bool:
            assert process.poll() is None, (tmp_path / "streamlit.log").read_text()[-2000:]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=5) as answer:
                return answer.status == 200

        serve.wait_for(healthy, "streamlit", 120)
    finally:
        process.terminate()
        process.wait(timeout=30)


@dataclass
class Instance:
    process: subprocess.Popen
    run_dir: Path
    ports: dict[str, int]

    @property
    def log(self) -> Path:
        return self.run_dir / "container.log"

    def inference_requests(self) -> float:
        metrics = requests.get(f"http://127.0.0.1:{self.ports['metrics']}/metrics", timeout=10).text
        counts = [line.rsplit(" ", 1)[1] for line in metrics.splitlines() if line.startswith("ts_inference_requests_total")]
        return sum(map(float, counts))


@dataclass
class ScaledOut:
    url: str
    instances: list[Instance]


def taken(instances: list[Instance]) -> tuple[int, ...]:
    """Every port the instances were given, gRPC's second one included."""
    return tuple(port for i in instances for port in (*i.ports.values(), i.ports["grpc"] + 1))


@pytest.fixture(scope="module")
def scaled_out(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScaledOut]:
    """Two TorchServe instances, each started with the compose torchserve service's command and MODEL=resnet18,
    behind one nginx rendered from serving/nginx.conf with both as upstream servers."""
    command = local_command(load_compose()["services"]["torchserve"]["command"])
    root = tmp_path_factory.mktemp("scaleout")
    model_store = root / "model_store"
    workers = {"minWorkers": INSTANCE_WORKERS, "maxWorkers": INSTANCE_WORKERS}
    serve.build_archives(model_store, model_config=settings_copy("model-config.yaml", root, **workers),
                         explain_config=settings_copy("explain-config.yaml", root, **workers))
    instances: list[Instance] = []
    try:
        for i in range(2):
            run_dir = root / f"torchserve-{i}"
            run_dir.mkdir()
            ports = serve.free_ports(taken(instances))  # the first instance may not have bound its ports yet
            args = ["--run-dir", str(run_dir), "--model-store", str(model_store)]
            args += [arg for name, port in ports.items() for arg in (f"--{name}-port", str(port))]
            with open(run_dir / "container.log", "wb") as log:
                process = subprocess.Popen([*command, *args], cwd=ROOT, env=dict(os.environ, MODEL="resnet18"), stdout=log,
                                           stderr=subprocess.STDOUT)
            instances.append(Instance(process, run_dir, ports))
        for instance in instances:
            def serving(instance: Instance = instance) -> bool:
                assert instance.process.poll() is None, instance.log.read_text()[-3000:]
                return "TorchServe serving resnet18 (default)" in instance.log.read_text()

            serve.wait_for(serving, "TorchServe from the container command", STARTUP_SECONDS)
        port = serve.free_port(taken(instances))
        serve.start_nginx(root, f"127.0.0.1:{port}", [f"127.0.0.1:{i.ports['inference']}" for i in instances])
        serve.wait_for(lambda: serve.health_ok(f"http://127.0.0.1:{port}/health"), "nginx", 30)
        yield ScaledOut(f"http://127.0.0.1:{port}", instances)
    finally:
        serve.stop_nginx(root)
        for instance in instances:
            if instance.process.poll() is None:
                instance.process.send_signal(signal.SIGTERM)
        for instance in instances:
            try:
                instance.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                serve.stop_torchserve(instance.run_dir)
                instance.process.kill()
                instance.process.wait()


@dataclass
class Answer:
    sent: float
    status: int
    body: object


def post_load(url: str, bodies: list[bytes], first: int, until: threading.Event, answers: list[Answer]) -> None:
    for n in itertools.count(first):
        if until.is_set():
            return
        sent = time.monotonic()
        try:
            response = requests.post(f"{url}/predict", data=bodies[n % len(bodies)],
                                     headers={"Content-Type": "application/json"}, timeout=120)
        except requests.RequestException as exc:  # no answer at all: recorded, and the test fails on it
            answers.append(Answer(sent, 0, repr(exc)))
            continue
        try:
            answers.append(Answer(sent, response.status_code, response.json()))
        except ValueError:
            answers.append(Answer(sent, response.status_code, response.text))


def test_instances_started_side_by_side_keep_their_worker_sockets_apart(scaled_out: ScaledOut) -> None:
    """Started at once on one host, each instance's workers listen in its own run folder: in a shared /tmp, one
    instance's worker could take over the other's socket of the same name before its frontend connected."""
    sockets = [{path.name for path in (instance.run_dir / "tmp").glob(".ts.sock.*")} for instance in scaled_out.instances]
    assert all(sockets) and sockets[0] == sockets[1], sockets  # the same names, each in its own folder
    for instance in scaled_out.instances:
        model_log = (instance.run_dir / "torchserve" / "model_log.log").read_text()
        assert f"Listening on port: {instance.run_dir / 'tmp' / '.ts.sock.'}" in model_log


def test_archives_built_at_once_on_one_host_are_both_whole(tmp_path: Path) -> None:
    stores = [tmp_path / "one", tmp_path / "two"]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(serve.build_archives, stores))
    expected = {f"{model}-{arch}.mar" for model in serve.MODELS for arch in ARCHITECTURES}
    for store in stores:
        assert {path.name for path in store.iterdir()} == expected
        for archive in store.iterdir():
            with zipfile.ZipFile(archive) as files:
                assert files.testzip() is None and "serving/skin_handler.py" in files.namelist()


def test_a_run_folder_too_deep_for_the_worker_sockets_is_a_clear_error(tmp_path: Path) -> None:
    deep = tmp_path / ("x" * 100)
    run = subprocess.run([sys.executable, str(ROOT / "serve.py"), "torchserve", "--run-dir", str(deep)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "give a shorter --run-dir" in run.stderr and "Traceback" not in run.stderr


def test_an_explanation_refused_by_one_instance_neither_ejects_it_nor_is_replayed(scaled_out: ScaledOut,
                                                                                  image_b64: str) -> None:
    refusing, other = scaled_out.instances
    management = f"http://127.0.0.1:{refusing.ports['management']}/models/skin-explain/resnet18"
    # Without explanation workers, TorchServe answers that instance's explanations 503 at once.
    assert requests.put(f"{management}?min_worker=0&max_worker=0&synchronous=true", timeout=120).status_code == 200
    try:
        explain = {"image": image_b64, "explain": True, "method": "gradcam"}
        # Ten: within the client's explanation burst (1 + 10 at once, serving/nginx.conf), as the refused ones answer
        # at once and an eleventh or twelfth may come before the rate frees a place.
        statuses = [requests.post(f"{scaled_out.url}/predict", json=explain, timeout=120).status_code for _ in range(10)]
        # Spread by request id: those on the refusing instance come back 503, none replayed on the other one.
        assert set(statuses) == {200, 503}, statuses
        served = refusing.inference_requests()
        for _ in range(12):  # within fail_timeout (5 s) of those 503s
            assert requests.post(f"{scaled_out.url}/predict", json={"image": image_b64}, timeout=60).status_code == 200
        assert refusing.inference_requests() > served, "the instance was ejected from plain predictions"
    finally:
        requests.put(f"{management}?min_worker={INSTANCE_WORKERS}&max_worker={INSTANCE_WORKERS}&synchronous=true",
                     timeout=300)


def test_stopping_one_instance_under_load_loses_no_answer(scaled_out: ScaledOut, fullres_images: list[Path]) -> None:
    images = fullres_images[:LOAD_THREADS + 1]
    bodies = [json.dumps({"image": base64.b64encode(p.read_bytes()).decode()}).encode() for p in images]
    answers: list[Answer] = []
    until = threading.Event()
    threads = [threading.Thread(target=post_load, args=(scaled_out.url, bodies, i, until, answers)) for i in range(LOAD_THREADS)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(LOAD_SECONDS)
        # nginx balanced the load over both instances before one goes.
        assert all(instance.inference_requests() > 0 for instance in scaled_out.instances)
        victim, survivor = scaled_out.instances
        victim.process.send_signal(signal.SIGTERM)  # what `docker stop` sends to the container's command
        assert victim.process.wait(timeout=90) == 0, victim.log.read_text()[-3000:]
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{victim.ports['inference']}/ping", timeout=5)
        served_before = survivor.inference_requests()
        stopped = time.monotonic()
        time.sleep(LOAD_SECONDS)
    finally:
        until.set()
        for thread in threads:
            thread.join(timeout=180)

    for answer in answers:
        assert isinstance(answer.body, dict), f"{answer.status}: {answer.body!r:.300}"
        if answer.status == 200:
            assert answer.body["success"] is True and answer.body["model"] == "resnet18"
        else:
            assert answer.body == {"success": False, "error": answer.body["error"]}, answer.body
    after = [answer for answer in answers if answer.sent > stopped]
    assert len(after) >= LOAD_THREADS, "the load stopped with the instance"
    assert [a.status for a in after] == [200] * len(after), [a.body for a in after if a.status != 200]
    assert survivor.inference_requests() - served_before >= len(after)


def processes_in(folder: Path) -> list[int]:
    """Processes whose working directory is `folder` (TorchServe's frontend and workers run in their run folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and Path(os.readlink(entry / "cwd")) == folder:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_a_container_command_that_gives_up_waiting_takes_torchserve_with_it(model_store: Path, tmp_path: Path) -> None:
    """The container's command waits for the model workers; when it gives up (a slow start on a busy host), the
    TorchServe it started must not run on without it, holding ports and memory."""
    ports = serve.free_ports(())
    script = ("import sys, serve; from pathlib import Path; "
              f"serve.run_torchserve(Path({str(tmp_path)!r}), Path({str(model_store)!r}), {ports!r}, 'resnet18', "
              "'127.0.0.1', timeout=1)")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "not ready after 1 s" in result.stderr
    serve.wait_for(lambda: not processes_in(tmp_path), "TorchServe to stop", 60)
