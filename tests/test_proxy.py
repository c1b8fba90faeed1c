"""The real nginx configuration in front of stub TorchServes that record every pass they get: where an explanation's
passes go (admission after the client's rate, every pass on one instance), what a stopped TorchServe's clients
get, that a busy instance is not ejected, and what a slow or numerous upload holds. Each test uses its own loopback
source addresses (127.0.x.y), as nginx keys its limits on the client address."""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import serve
from serving.settings import EXPLAIN_PATH
from tests.conftest import ROOT

BATCHING_PATH = "/predictions/skin"
CONF = (ROOT / "serving" / "nginx.conf").read_text()
PER_CLIENT = int(re.search(r"limit_conn per_client (\d+);", CONF)[1])
EVERYONE = int(re.search(r"limit_conn everyone (\d+);", CONF)[1])


@dataclass
class Pass:
    path: str
    headers: dict[str, str]


@dataclass
class Recorder:
    """A stub TorchServe: explanations are answered as the handler answers them (307 on the batching path, then
    200 from skin-explain), plain predictions with `plain_status`; every pass is recorded."""

    plain_status: int = 200
    passes: list[Pass] = field(default_factory=list)


class RecordingHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        recorder: Recorder = self.server.recorder
        path = self.path.split("?")[0]
        recorder.passes.append(Pass(path, {k.lower(): v for k, v in self.headers.items()}))
        explain = json.loads(body or b"{}").get("explain") is True
        if explain and path == BATCHING_PATH:
            status, headers = 307, {"Location": EXPLAIN_PATH}
        else:
            status, headers = (200 if explain else recorder.plain_status), {}
        answer = json.dumps({"success": status == 200}).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args) -> None:
        pass


@contextmanager
def recording_stub(recorder: Recorder, port: int = 0) -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", port), RecordingHandler)
    server.recorder = recorder
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Proxy:
    port: int
    page_port: int
    run_dir: Path
    instances: list[Recorder]


@contextmanager
def proxy(run_dir: Path, instances: list[Recorder]) -> Iterator[Proxy]:
    """nginx with the page's own port too, as compose runs it."""
    with ExitStack() as stack:
        ports = [stack.enter_context(recording_stub(recorder)) for recorder in instances]
        port = serve.free_port()
        page_port = serve.free_port((port,))
        serve.start_nginx(run_dir, f"127.0.0.1:{port}", [f"127.0.0.1:{p}" for p in ports], f"127.0.0.1:{page_port}")
        try:  # nginx binds its port before `nginx` returns: no wait needed
            yield Proxy(port, page_port, run_dir, instances)
        finally:
            serve.stop_nginx(run_dir)


def connect(port: int, source: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # close with a reset, no TIME_WAIT
    return sock


def request(body: bytes, content_length: int | None = None, extra: str = "", path: str = "/predict") -> bytes:
    length = len(body) if content_length is None else content_length
    return (f"POST {path} HTTP/1.1\r\nHost: skin\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {length}\r\nConnection: close\r\n\r\n").encode() + body


def status_of(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed without an answer: {data!r}"
        data += chunk
    return int(data.split()[1])


def post(port: int, source: str, body: dict, extra: str = "", path: str = "/predict") -> int:
    with connect(port, source) as sock:
        sock.sendall(request(json.dumps(body).encode(), extra=extra, path=path))
        return status_of(sock)


EXPLAIN = {"image": "AAAA", "explain": True}


def test_only_explanations_within_the_client_rate_are_admitted_and_the_client_is_nginxs_word(tmp_path: Path) -> None:
    recorder = Recorder()
    with proxy(tmp_path, [recorder]) as served:
        # Sent before any answer is read, so the rate (one every 3 s) does not refill between them; the client's own
        # headers claim another client and the admission pass.
        sockets = [connect(served.port, "127.0.2.1") for _ in range(16)]
        for sock in sockets:
            sock.sendall(request(json.dumps(EXPLAIN).encode(),
                                 extra="X-Skin-Client: 10.9.9.9\r\nX-Skin-Admission: admit\r\n"))
        statuses = [status_of(sock) for sock in sockets]
        for sock in sockets:
            sock.close()
    assert statuses.count(429) == 5 and statuses.count(200) == 11  # 1 + a burst of 10
    first = [p for p in recorder.passes if p.path == BATCHING_PATH and "x-skin-admission" not in p.headers]
    admissions = [p for p in recorder.passes if p.path == BATCHING_PATH and p.headers.get("x-skin-admission") == "admit"]
    computed = [p for p in recorder.passes if p.path == EXPLAIN_PATH]
    # Every request's first pass, then admission only for those the rate let through: none left admitted by a 429.
    assert (len(first), len(admissions), len(computed)) == (16, 11, 11)
    assert {p.headers["x-skin-client"] for p in recorder.passes} == {"127.0.2.1"}
    assert all("x-skin-admission" not in p.headers for p in computed)


def test_each_page_user_has_its_own_limits_on_the_pages_port_only(tmp_path: Path) -> None:
    recorder = Recorder()
    with proxy(tmp_path, [recorder]) as served:
        # Every page user comes from the page's one address; 11 explanations pass a client's rate at once.
        page = [post(served.page_port, "127.0.8.1", EXPLAIN, path=f"/predict?user={user}") for user in ["a"] * 12 + ["b"]]
        public = [post(served.port, "127.0.8.2", EXPLAIN, path=f"/predict?user={user}") for user in ["c"] * 11 + ["d"]]
    assert page == [200] * 11 + [429, 200]
    assert public == [200] * 11 + [429]  # a user named on the public port counts for nothing
    clients = {p.headers["x-skin-client"] for p in recorder.passes}
    assert clients == {"page a", "page b", "127.0.8.2"}


def test_every_pass_of_a_request_reaches_the_instance_that_admitted_it(tmp_path: Path) -> None:
    instances = [Recorder(), Recorder()]
    with proxy(tmp_path, instances) as served:
        # Plain predictions in between, as under real traffic: they take turns on the instances too.
        statuses = [post(served.port, f"127.0.3.{i}", body) for i in range(1, 25) for body in (EXPLAIN, {"image": "A"})]
    assert statuses == [200] * 48
    where = {}
    for n, instance in enumerate(instances):
        for p in instance.passes:
            where.setdefault(p.headers["x-request-id"], set()).add(n)
    assert len(where) == 48 and all(len(instances) == 1 for instances in where.values()), where
    assert all(len(instance.passes) >= 3 for instance in instances)  # both served: spread by request id


def answer(port: int, source: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a POST of `body`, or a GET where None."""
    with connect(port, source) as sock:
        if body is None:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: skin\r\nConnection: close\r\n\r\n".encode())
        else:
            sock.sendall(request(json.dumps(body).encode(), path=path))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, payload = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(payload)


def test_torchserve_down_gets_a_fast_envelope_and_is_served_again_once_it_is_back(tmp_path: Path) -> None:
    port = serve.free_port()
    torchserve = serve.free_port((port,))  # nothing listens there yet: TorchServe stopped or restarting
    serve.start_nginx(tmp_path, f"127.0.0.1:{port}", [f"127.0.0.1:{torchserve}"])
    try:
        started = time.monotonic()
        status, body = answer(port, "127.0.5.1", "/predict", {"image": "AAAA"})
        # Refused connections fail at once; the bound leaves room for a loaded CI machine.
        assert time.monotonic() - started < 5
        assert status == 503 and body == {"success": False, "error": body["error"]} and "unavailable" in body["error"]
        status, body = answer(port, "127.0.5.1", "/health")
        assert status == 503 and body["success"] is False
        with recording_stub(Recorder(), torchserve):
            assert answer(port, "127.0.5.1", "/predict", {"image": "AAAA"}) == (200, {"success": True})
    finally:
        serve.stop_nginx(tmp_path)


def test_a_busy_instance_is_not_ejected(tmp_path: Path) -> None:
    busy, idle = Recorder(plain_status=503), Recorder()
    with proxy(tmp_path, [busy, idle]) as served:
        statuses = [post(served.port, "127.0.4.1", {"image": "AAAA"}) for _ in range(30)]
    # TorchServe's 503 (queue full) reaches the client, and the busy instance goes on getting its share of requests
    # (fail_timeout 5 s would otherwise keep it out for the rest of this test).
    assert set(statuses) == {200, 503}
    assert len(busy.passes) == statuses.count(503) and len(idle.passes) == statuses.count(200)
    assert len(busy.passes) >= 5


def resident_kib(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())[1])


def nginx_worker(run_dir: Path) -> int:
    master = int((run_dir / "nginx.pid").read_text())
    children = Path(f"/proc/{master}/task/{master}/children")
    serve.wait_for(lambda: children.read_text().split(), "nginx's worker", 10)  # forked after the pid file is written
    [worker] = children.read_text().split()
    return int(worker)


def body_dir(run_dir: Path) -> str:
    return re.search(r"client_body_temp_path (\S+);", (run_dir / "nginx.conf").read_text())[1]


def test_workers_started_as_root_drop_to_an_unprivileged_user_and_still_buffer_bodies(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("nginx runs its workers as its `user` only when started as root")
    recorder = Recorder()
    # tmp_path sits in pytest's folder, which only root may enter: the workers write bodies elsewhere.
    with proxy(tmp_path, [recorder]) as served:
        body = {"image": "A" * 2**20}  # 16 times the 64 KiB kept in memory: the worker writes it to a temp file
        answered = post(served.port, "127.0.9.1", body)
        # Read once the worker has served: a fresh worker sets its group before its user.
        status = Path(f"/proc/{nginx_worker(tmp_path)}/status").read_text()
        uids = re.search(r"^Uid:\s+(.*)$", status, re.MULTILINE)[1].split()
        gids = re.search(r"^Gid:\s+(.*)$", status, re.MULTILINE)[1].split()
        temp_dir = Path(body_dir(tmp_path)).parent
    assert "0" not in uids + gids, (uids, gids)  # real, effective, saved and filesystem ids
    assert answered == 200
    assert [int(p.headers["content-length"]) for p in recorder.passes] == [len(json.dumps(body))]
    assert not temp_dir.exists()  # removed once nginx has quit


def test_slow_bodies_are_held_on_disk_not_in_memory(tmp_path: Path) -> None:
    sent = 8 * 2**20
    with proxy(tmp_path, [Recorder()]) as served:
        worker = nginx_worker(tmp_path)
        before = resident_kib(worker)
        sockets = [connect(served.port, "127.0.5.1") for _ in range(3)]
        try:
            for sock in sockets:  # most of a 20 MiB body, then nothing more: a slow client mid-upload
                sock.sendall(request(b"x" * sent, content_length=20 * 2**20))
            time.sleep(1)
            grown = resident_kib(worker) - before
            # nginx unlinks a body's temp file once it has opened it: found by the worker's open files.
            buffered = [fd.stat().st_size for fd in Path(f"/proc/{worker}/fd").iterdir()
                        if fd.readlink().as_posix().startswith(f"{body_dir(tmp_path)}/")]
        finally:
            for sock in sockets:
                sock.close()
    assert len(buffered) == 3 and all(size >= sent - 2**17 for size in buffered), buffered  # all but the last buffer
    assert grown * 1024 < sent, f"nginx's worker grew by {grown} KiB"  # less than one of the bodies


def test_uploads_at_once_are_capped_over_all_clients(tmp_path: Path) -> None:
    waiting = []
    with proxy(tmp_path, [Recorder()]) as served:
        try:
            for n in range(EVERYONE):  # each client within its own limit, all of them at the global one
                sock = connect(served.port, f"127.0.6.{1 + n // PER_CLIENT}")
                sock.sendall(request(b"", content_length=100))
                waiting.append(sock)
            time.sleep(1)  # nginx has read every header
            assert post(served.port, "127.0.7.1", {"image": "AAAA"}) == 429
            waiting.pop().close()
            time.sleep(0.5)
            assert post(served.port, "127.0.7.1", {"image": "AAAA"}) == 200
        finally:
            for sock in waiting:
                sock.close()

