"""nginx's per-client limits and timeouts, through the real nginx and TorchServe: a client holding many idle
connections, too many requests at once, explanations beyond the rate, a body sent too slowly. Each test uses
its own loopback source address (127.0.0.x), as nginx keys its limits on the client address."""

from __future__ import annotations

import base64
import json
import socket
import time
import urllib.parse

import pytest
import requests

from serving.admission import LEDGER_NAME, Ledger


def address(service) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(service.url)
    return parts.hostname, parts.port


def connect(service, source: str) -> socket.socket:
    sock = socket.create_connection(address(service), timeout=30, source_address=(source, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # close with a reset, no TIME_WAIT
    return sock


def headers(content_length: int) -> bytes:
    return (f"POST /predict HTTP/1.1\r\nHost: skin\r\nContent-Type: application/json\r\n"
            f"Content-Length: {content_length}\r\n\r\n").encode()


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    """(status, headers, JSON body) of one HTTP answer that ends with the connection or its length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed without an answer: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    fields = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(fields.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), fields, json.loads(body)


def test_a_client_holding_many_idle_connections_does_not_stop_another(service, image_b64) -> None:
    idle = []
    try:
        for _ in range(1_100):  # more than the 1,024 connections nginx used to allow in all
            sock = connect(service, "127.0.0.2")
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: skin\r\n")  # headers never finished
            idle.append(sock)
        answer = requests.post(service.predict_url, json={"image": image_b64}, timeout=60)
        assert answer.status_code == 200 and answer.json()["success"] is True
        # client_header_timeout (10 s) closes the idle connections.
        time.sleep(12)
        for sock in idle[:: len(idle) // 20]:
            sock.settimeout(5)
            try:
                assert sock.recv(1024) in (b"",) or b" 408 " in sock.recv(1024)
            except ConnectionResetError:
                pass
    finally:
        for sock in idle:
            sock.close()


def test_too_many_requests_at_once_from_one_address_get_429_with_the_envelope(service) -> None:
    waiting = []
    try:
        for _ in range(32):  # the per-client limit: each has sent its headers and holds its body back
            sock = connect(service, "127.0.0.3")
            sock.sendall(headers(100))
            waiting.append(sock)
        time.sleep(1)  # nginx has read every header
        extra = connect(service, "127.0.0.3")
        extra.sendall(headers(2) + b"{}")
        status, fields, body = read_answer(extra)
        extra.close()
        assert status == 429 and fields["retry-after"] == "10"
        assert body["success"] is False and "at most 32 at once" in body["error"]
        other = requests.post(service.predict_url, json={}, timeout=30)  # another address is not limited
        assert other.status_code == 400
    finally:
        for sock in waiting:
            sock.close()


def test_explanations_beyond_the_rate_get_429(service) -> None:
    body = json.dumps({"image": base64.b64encode(b"not an image").decode(), "explain": True}).encode()
    # All 16 sent before any answer is read: nginx decides each on arrival, within a few ms, so none of the rate
    # (one every 3 s) refills between them however slowly the explanation model answers the admitted ones.
    ledger = Ledger(service.run_dir / "tmp" / LEDGER_NAME)
    with ledger.connect() as db:
        admitted_before = {r for (r,) in db.execute("SELECT request_id FROM admitted")}
    sockets = [connect(service, "127.0.0.4") for _ in range(16)]
    for sock in sockets:
        sock.sendall(headers(len(body)) + body)
    statuses = []
    for sock in sockets:
        status, fields, answer = read_answer(sock)
        sock.close()
        statuses.append(status)
        assert answer["success"] is False
        if status == 429:
            assert fields["retry-after"] == "10" and "20 explanations a minute" in answer["error"]
        else:  # passed by nginx: refused by the explanation model as not an image, or as busy by its admission
            assert status in (400, 503)
    assert statuses.count(429) in (4, 5)  # 1 + a burst of 10 pass, the rest within the minute are refused
    assert 400 in statuses
    # The batching pool admitted those the rate then refused: they were released, not left counting for 120 s.
    with ledger.connect() as db:
        assert {r for (r,) in db.execute("SELECT request_id FROM admitted")} <= admitted_before


def test_a_body_sent_too_slowly_gets_408(service) -> None:
    sock = connect(service, "127.0.0.5")
    try:
        sock.sendall(headers(1000) + b'{"image": ')
        sock.settimeout(30)
        started = time.monotonic()
        try:
            status, _, body = read_answer(sock)
        except (ConnectionResetError, AssertionError):
            status, body = None, None
        assert time.monotonic() - started < 20  # closed by client_body_timeout (10 s), not by the client
        if status is not None:
            assert status == 408 and body["success"] is False
    finally:
        sock.close()


@pytest.fixture(autouse=True)
def many_files() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
