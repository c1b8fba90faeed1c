"""The nginx in front of TorchServe: its template (serving/nginx.conf) filled in for one run."""

from __future__ import annotations

from pathlib import Path

NGINX_TEMPLATE = Path(__file__).resolve().parent / "nginx.conf"

def render_nginx_conf(listen: str, upstreams: list[str], run_dir: Path, log_dir: Path, user: str,
                      page_listen: str | None = None, temp_dir: Path | None = None) -> str:
    """serving/nginx.conf with its ${VARIABLES} filled in, as the nginx image's envsubst would; `user` runs the
    workers (where nginx starts as root: "name group"), which write request bodies under `temp_dir` (default
    `run_dir`); `page_listen` (none in the local run) is the page's own address, where nginx takes the page's
    word for who its user is."""
    values = {
        "NGINX_USER": user,
        "NGINX_LISTEN": listen,
        "NGINX_PAGE_LISTEN": f"listen {page_listen};" if page_listen else "",
        "NGINX_PAGE_PORT": page_listen.rsplit(":", 1)[-1] if page_listen else "",
        "NGINX_RUN_DIR": str(run_dir),
        "NGINX_TEMP_DIR": str(temp_dir or run_dir),
        "NGINX_LOG_DIR": str(log_dir),
        "TORCHSERVE_SERVERS": "\n        ".join(f"server {u} max_fails=1 fail_timeout=5s;" for u in upstreams),
    }
    text = NGINX_TEMPLATE.read_text()
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    return text
