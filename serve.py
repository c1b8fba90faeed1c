"""Start and stop the local service: TorchServe with both model versions, behind nginx.

    python serve.py start [--port 8089] [--run-dir logs] [--model resnet34]
    python serve.py stop [--run-dir logs]
    python serve.py set-default resnet18
    python serve.py torchserve [--bind 0.0.0.0] [--model resnet34]   (TorchServe alone, in the foreground)

serve.sh installs what is missing, builds the archives and calls this; the container runs `serve.py torchserve`.
Tests call it too, on free ports.
"""

from __future__ import annotations

import argparse
import grp
import json
import os
import pwd
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from client import set_default
from serving.proxy import render_nginx_conf
from serving.settings import DEFAULT_MANAGEMENT_URL, DEFAULT_PORTS, TORCHSERVE_MODELS
from skinlesion.options import ARCHITECTURE_NAMES

ROOT = Path(__file__).resolve().parent
MODELS = TORCHSERVE_MODELS
# The longest worker socket name TorchServe gives (a 5-digit port), and the most a Unix socket path holds on Linux.
WORKER_SOCKET = ".ts.sock.65535"
SOCKET_PATH_BYTES = 107


def torchserve_env(run_dir: Path, ports: dict[str, int], bind: str = "127.0.0.1") -> dict[str, str]:
    """Environment for one TorchServe instance: its own ports, logs, pid file and worker sockets, so that several
    run side by side. TorchServe keeps the pid file in TMPDIR; its frontend takes TEMP as java.io.tmpdir, where it
    names its workers' sockets (.ts.sock.9000, ...): in a shared /tmp, a worker of one instance starting beside
    another's would take over the other's socket. `bind` is the inference API's address; management and metrics
    stay on the loopback interface."""
    tmp = run_dir.absolute() / "tmp"
    if len(os.fsencode(tmp / WORKER_SOCKET)) > SOCKET_PATH_BYTES:
        raise ValueError(f"{run_dir}: too long a path for TorchServe's worker sockets ({tmp / WORKER_SOCKET}, over "
                         f"{SOCKET_PATH_BYTES} bytes): give a shorter --run-dir")
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        TMPDIR=str(tmp),
        TEMP=str(tmp),
        LOG_LOCATION=str(run_dir / "torchserve"),
        METRICS_LOCATION=str(run_dir / "torchserve"),
        TS_INFERENCE_ADDRESS=f"http://{bind}:{ports['inference']}",
        TS_MANAGEMENT_ADDRESS=f"http://127.0.0.1:{ports['management']}",
        TS_METRICS_ADDRESS=f"http://127.0.0.1:{ports['metrics']}",
        TS_GRPC_INFERENCE_PORT=str(ports["grpc"]),
        TS_GRPC_MANAGEMENT_PORT=str(ports["grpc"] + 1),
        PYTHONPATH=str(ROOT),
        TQDM_DISABLE="1",  # lime draws a progress bar per explanation into the worker log
    )
    return env


def http_json(method: str, url: str, timeout: float = 5.0) -> tuple[int, object]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            return error.code, json.loads(body or b"null")
        except ValueError:
            return error.code, body.decode(errors="replace")


def wait_for(check, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


def versions_ready(management: str, models: tuple[str, ...] = MODELS) -> bool:
    """Whether each of `models` has every version registered, each with its workers up."""
    for model in models:
        status, versions = http_json("GET", f"{management}/models/{model}/all")
        if not (status == 200 and len(versions) == len(ARCHITECTURE_NAMES) and all(v["workers"] for v in versions)
                and all(w["status"] == "READY" for v in versions for w in v["workers"])):
            return False
    return True


def build_archives(model_store: Path, weights_dir: Path = ROOT / "model_store", model_config: Path | None = None,
                   explain_config: Path | None = None) -> None:
    """archive.sh into `model_store`: every model's archives from the state dicts in `weights_dir`, with
    `model_config` and `explain_config` as the TorchServe settings of "skin" and "skin-explain" (default:
    serving/model-config.yaml and serving/explain-config.yaml)."""
    env = dict(os.environ, MODEL_STORE=str(model_store), WEIGHTS_DIR=str(weights_dir),
               ARCHIVER=str(Path(sys.executable).parent / "torch-model-archiver"))
    for name, config in (("MODEL_CONFIG", model_config), ("EXPLAIN_CONFIG", explain_config)):
        if config is not None:
            env[name] = str(config.resolve())
    subprocess.run([str(ROOT / "archive.sh")], env=env, check=True, capture_output=True)


def torchserve_command(model_store: Path) -> list[str]:
    """The TorchServe command line of the local run and the container: every version of every model."""
    archives = [f"{model}-{arch}.mar" for model in MODELS for arch in ARCHITECTURE_NAMES]
    return [str(Path(sys.executable).parent / "torchserve"), "--start", "--ncs", "--ts-config", str(ROOT / "config.properties"),
            "--log-config", str(ROOT / "log4j2.xml"), "--model-store", str(model_store), "--models", *archives]


def await_versions(ports: dict[str, int], default: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> str:
    """Wait until every version has its workers, then make `default` the default; returns the management URL."""
    management = f"http://127.0.0.1:{ports['management']}"

    def ready() -> bool:
        if not alive():
            raise RuntimeError("TorchServe exited before its models were ready (see its log)")
        return versions_ready(management)

    wait_for(ready, "TorchServe's model workers", timeout)
    set_default(management, default)
    return management


def start_torchserve(run_dir: Path, model_store: Path, ports: dict[str, int], default: str, timeout: float = 180) -> str:
    """Start one TorchServe in the background (stop_torchserve ends it); returns its management URL once ready."""
    with open(run_dir / "torchserve.out", "ab") as out:
        subprocess.run(torchserve_command(model_store), env=torchserve_env(run_dir, ports), cwd=run_dir,
                       stdout=out, stderr=subprocess.STDOUT, check=True)
    return await_versions(ports, default, timeout)


def run_torchserve(run_dir: Path, model_store: Path, ports: dict[str, int], default: str, bind: str,
                   timeout: float = 180) -> int:
    """TorchServe in the foreground, its log on our stdout, until it exits: the container's main process."""
    # `docker stop` sends SIGTERM here (Ctrl+C SIGINT): stop TorchServe the way `serve.py stop` does.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda *_: stop_torchserve(run_dir))
    process = subprocess.Popen([*torchserve_command(model_store), "--foreground"],
                               env=torchserve_env(run_dir, ports, bind), cwd=run_dir)
    try:
        await_versions(ports, default, timeout, alive=lambda: process.poll() is None)
    except BaseException:
        # The container's command gives up: TorchServe (a child that outlives us) must go with it.
        stop_torchserve(run_dir)
        process.wait()
        raise
    print(f"TorchServe serving {default} (default) on {bind}:{ports['inference']}", flush=True)
    return process.wait()


def stop_torchserve(run_dir: Path) -> None:
    # `torchserve --stop` finds the instance by the pid file in its TMPDIR; ports don't matter here.
    env = dict(os.environ, TMPDIR=str(run_dir / "tmp"))
    subprocess.run([str(Path(sys.executable).parent / "torchserve"), "--stop"], env=env, cwd=run_dir,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def start_nginx(run_dir: Path, listen: str, upstreams: list[str], page_listen: str | None = None) -> Path:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    conf = run_dir / "nginx.conf"
    log_dir = run_dir / "nginx"
    log_dir.mkdir(parents=True, exist_ok=True)
    user, temp_dir = nginx_workers(run_dir)
    conf.write_text(render_nginx_conf(listen, upstreams, run_dir, log_dir, user, page_listen, temp_dir))
    command = [nginx, "-c", str(conf), "-e", str(log_dir / "error.log")]
    # Restarting TorchServe alone leaves nginx up: reload its configuration instead of a second bind.
    subprocess.run(command + (["-s", "reload"] if nginx_running(run_dir) else []), check=True)
    return conf


# Who nginx's workers run as when its master runs as root, the first that exists: Debian's nginx user, the nginx
# image's, and the one every Linux has. Never root: a worker parses every request from the network.
NGINX_WORKER_USERS = ("www-data", "nginx", "nobody")
# Where such workers write request bodies: a folder any user can reach, on disk (/tmp may be memory: tmpfs).
NGINX_TEMP_PARENT = Path("/var/tmp")


def nginx_workers(run_dir: Path) -> tuple[str, Path]:
    """The value of nginx's `user` ("name group") and the folder its workers write request bodies in.

    Not root: nginx ignores `user`, its workers run as we do and write in the run folder. Root: an unprivileged
    user, writing in a folder of the run's own under NGINX_TEMP_PARENT, as the run folder may sit in a folder only
    root can enter (pytest's and the benchmarks' do). That folder is root's; nginx makes the folders inside it and
    gives them to the workers, which so cannot swap one for a link to a file root would then hand them."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name, run_dir
    for name in NGINX_WORKER_USERS:
        try:
            worker = pwd.getpwnam(name)
            break
        except KeyError:
            continue
    else:
        raise RuntimeError(f"none of the users nginx's workers may run as exists: {', '.join(NGINX_WORKER_USERS)}")
    try:
        group = grp.getgrgid(worker.pw_gid).gr_name
    except KeyError:
        group = worker.pw_name
    return f"{worker.pw_name} {group}", nginx_temp_dir(run_dir)


def nginx_temp_dir(run_dir: Path) -> Path:
    """The run's folder for nginx's temp files under NGINX_TEMP_PARENT, linked from the run folder as
    `nginx-temp`: the one already made while it is still root's and closed to others' writes (nginx reloaded
    keeps its in-flight bodies there), else a new one."""
    link = run_dir / "nginx-temp"
    try:
        kept = link.readlink()
        info = kept.lstat()
        if stat.S_ISDIR(info.st_mode) and info.st_uid == 0 and not info.st_mode & 0o022:
            return kept
    except OSError:
        pass
    made = Path(tempfile.mkdtemp(prefix="skin-nginx-", dir=NGINX_TEMP_PARENT))
    made.chmod(0o711)  # workers pass through to their own folders; nobody lists or writes it
    link.unlink(missing_ok=True)
    link.symlink_to(made)
    return made


def remove_nginx_temp_dir(run_dir: Path) -> None:
    link = run_dir / "nginx-temp"
    if link.is_symlink():
        shutil.rmtree(link.readlink(), ignore_errors=True)
        link.unlink()


def nginx_running(run_dir: Path) -> bool:
    try:
        os.kill(int((run_dir / "nginx.pid").read_text()), 0)
    except (OSError, ValueError):
        return False
    return True


def stop_nginx(run_dir: Path, wait: float = 5.0) -> None:
    """Ask nginx to finish its requests and quit; once it has (or after `wait` seconds), remove its temp folder."""
    pid_file = run_dir / "nginx.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), signal.SIGQUIT)
        except (ProcessLookupError, ValueError):
            pass
        try:
            wait_for(lambda: not nginx_running(run_dir), "nginx's exit", wait)
        except TimeoutError:
            pass
    remove_nginx_temp_dir(run_dir)


def health_ok(url: str) -> bool:
    status, _ = http_json("GET", url, timeout=2)
    return status == 200


def torchserve_ports(args: argparse.Namespace) -> dict[str, int]:
    return {"inference": args.inference_port, "management": args.management_port,
            "metrics": args.metrics_port, "grpc": args.grpc_port}


def free_port(taken: tuple[int, ...] = ()) -> int:
    """A loopback port nothing listens on now, not in `taken` (tests and benchmarks run the service beside others).

    Picked below the kernel's ephemeral range, unlike bind(0): a port from that range can become the local
    end of an outgoing connection (nginx to TorchServe, a client to nginx) before the server binds it.
    """
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    while True:
        port = random.randrange(10000, ephemeral_low)
        if port not in taken and port_is_free(port):
            return port


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_ports(taken: tuple[int, ...] = ()) -> dict[str, int]:
    """Ports for one TorchServe; gRPC takes two, `grpc` for inference and the next one for management."""
    ports: dict[str, int] = {}
    for name in ("inference", "management", "metrics"):
        ports[name] = free_port((*taken, *ports.values()))
    while True:
        grpc = free_port((*taken, *ports.values()))
        if grpc + 1 not in (*taken, *ports.values()) and port_is_free(grpc + 1):
            return ports | {"grpc": grpc}


def start_service(run_dir: Path, model_store: Path, ports: dict[str, int], listen: str, default: str,
                  timeout: float = 180) -> tuple[str, str]:
    """TorchServe with every version behind nginx on `listen`; (public URL, management URL) once /health answers."""
    management = start_torchserve(run_dir, model_store, ports, default, timeout)
    start_nginx(run_dir, listen, [f"127.0.0.1:{ports['inference']}"])
    url = f"http://{listen}"
    wait_for(lambda: health_ok(f"{url}/health"), "nginx /health", 30)
    return url, management


def stop_service(run_dir: Path) -> None:
    stop_nginx(run_dir)
    stop_torchserve(run_dir)


def start(args: argparse.Namespace) -> None:
    run_dir = args.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    url, _ = start_service(run_dir, args.model_store.resolve(), torchserve_ports(args), f"{args.host}:{args.port}", args.model)
    print(f"serving {args.model} (default) at {url}/predict   logs: {run_dir}")


def stop(args: argparse.Namespace) -> None:
    stop_service(args.run_dir.resolve())
    print("stopped")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("start", "stop", "torchserve"):
        p = sub.add_parser(name)
        p.add_argument("--run-dir", type=Path, default=ROOT / "logs", help="logs, pid files and rendered configs")
        if name == "start":
            p.add_argument("--host", default="127.0.0.1", help="address nginx listens on")
            p.add_argument("--port", type=int, default=DEFAULT_PORTS["port"])
        if name == "torchserve":
            p.add_argument("--bind", default="127.0.0.1", help="address of TorchServe's inference API (0.0.0.0 in a container)")
        if name != "stop":
            p.add_argument("--inference-port", type=int, default=DEFAULT_PORTS["inference"])
            p.add_argument("--management-port", type=int, default=DEFAULT_PORTS["management"])
            p.add_argument("--metrics-port", type=int, default=DEFAULT_PORTS["metrics"])
            p.add_argument("--grpc-port", type=int, default=DEFAULT_PORTS["grpc"], help="and the next one")
            p.add_argument("--model-store", type=Path, default=ROOT / "model_store")
            p.add_argument("--model", choices=ARCHITECTURE_NAMES, default=os.environ.get("MODEL", "resnet34"))
    p = sub.add_parser("set-default", help="switch the default model version at runtime")
    p.add_argument("version", choices=ARCHITECTURE_NAMES)
    p.add_argument("--management-url", default=DEFAULT_MANAGEMENT_URL)
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            start(args)
        elif args.command == "stop":
            stop(args)
        elif args.command == "torchserve":
            run_dir = args.run_dir.resolve()
            run_dir.mkdir(parents=True, exist_ok=True)
            sys.exit(run_torchserve(run_dir, args.model_store.resolve(), torchserve_ports(args), args.model, args.bind))
        else:
            print(json.dumps(set_default(args.management_url, args.version)))
    except ValueError as exc:  # a setting that cannot work (torchserve_env)
        sys.exit(f"serve.py: {exc}")


if __name__ == "__main__":
    main()
