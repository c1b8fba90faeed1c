"""Dependency audit: known vulnerabilities in the pinned requirements and everything installed in .venv.

    .venv/bin/python scripts/audit.py [--venv .venv] [--no-fallback]

pip-audit (from its own throwaway venv, so its dependencies never change the project's) checks
  1. the pins of requirements.txt and requirements-dev.txt exactly as written, and
  2. every distribution installed in the venv, which adds what the pins pull in.
pip-audit asks PyPI's per-release JSON (/pypi/NAME/VERSION/json). Where that answers 404 (some
mirrors and proxies serve only the per-project page), a package would be silently "skipped"; this
script counts those as unaudited instead of clean, and falls back to the per-project page, whose
`vulnerabilities` cover the latest release only: a pin equal to the latest release is audited that
way, any other stays UNAUDITED.

Exit status: 0 when every package was audited and none is vulnerable, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIP_AUDIT = "pip-audit==2.10.1"
PYPI_PROJECT = "https://pypi.org/pypi/{name}/json"


def pip_audit_tool() -> Path:
    """pip-audit's executable in a venv of its own under the temp folder (made once, then reused)."""
    home = Path(tempfile.gettempdir()) / "skinlesion-pip-audit"
    tool = home / "bin" / "pip-audit"
    if not tool.exists():
        venv.create(home, with_pip=True)
        subprocess.run([str(home / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", PIP_AUDIT], check=True)
    return tool


def run_pip_audit(tool: Path, args: list[str]) -> list[dict]:
    """pip-audit's per-dependency records: {"name", "version", "vulns"} or {"name", "skip_reason"}."""
    # Exit status 1 only means "vulnerabilities found"; the JSON says everything either way.
    done = subprocess.run([str(tool), "--progress-spinner", "off", "--format", "json", *args],
                          capture_output=True, text=True, check=False)
    try:
        return json.loads(done.stdout)["dependencies"]
    except (ValueError, KeyError):
        sys.exit(f"pip-audit failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")


def latest_release(name: str) -> tuple[str, list[dict]] | None:
    """(latest version, its known vulnerabilities) from PyPI's per-project page; None if unreachable."""
    try:
        with urllib.request.urlopen(PYPI_PROJECT.format(name=name), timeout=30) as response:
            project = json.load(response)
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return project["info"]["version"], [
        {"id": v["id"], "aliases": v.get("aliases") or [], "fix_versions": v.get("fixed_in") or []}
        for v in project.get("vulnerabilities") or []
    ]


def installed_versions(python: Path) -> dict[str, str]:
    listing = subprocess.run([str(python), "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
                             capture_output=True, text=True, check=True).stdout
    return {d["name"].lower().replace("_", "-"): d["version"] for d in json.loads(listing)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv", help="the project's virtual environment")
    parser.add_argument("--no-fallback", action="store_true", help="report pip-audit's skipped packages as unaudited")
    args = parser.parse_args(argv)
    python = args.venv / "bin" / "python"
    site_packages = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    tool = pip_audit_tool()
    os.chdir(ROOT)
    # --no-deps: the files pin exact versions, so no resolver run (and no torch download) is needed.
    records = run_pip_audit(tool, ["--no-deps", "--disable-pip", "-r", "requirements.txt", "-r", "requirements-dev.txt"])
    records += run_pip_audit(tool, ["--path", site_packages])
    versions = installed_versions(python)
    findings: dict[tuple[str, str], dict] = {}
    audited: dict[str, str] = {}
    unaudited: dict[str, str] = {}
    for record in records:
        name = record["name"].lower().replace("_", "-")
        version = record.get("version") or versions.get(name, "?")
        if "skip_reason" in record:
            latest = None if args.no_fallback else latest_release(name)
            if latest is None or latest[0] != version:
                unaudited[name] = f"{version}: " + (f"not the latest release ({latest[0]})" if latest else record["skip_reason"])
                continue
            audited[name] = "PyPI project page (latest release)"
            vulns = latest[1]
        else:
            audited[name] = "pip-audit"
            vulns = record["vulns"]
        unaudited.pop(name, None)
        for vuln in vulns:
            findings[(name, vuln["id"])] = {"version": version, **vuln}
    print(f"audited {len(audited)} packages ({sum(v == 'pip-audit' for v in audited.values())} by pip-audit, "
          f"{sum(v != 'pip-audit' for v in audited.values())} by PyPI's latest-release data)")
    for (name, vuln_id), vuln in sorted(findings.items()):
        print(f"VULNERABLE {name} {vuln['version']}: {vuln_id} {' '.join(vuln['aliases'])} "
              f"fixed in: {', '.join(vuln['fix_versions']) or 'no fix'}")
    for name, reason in sorted(unaudited.items()):
        print(f"UNAUDITED  {name} {reason}")
    if not findings and not unaudited:
        print("no known vulnerabilities")
    return 1 if findings or unaudited else 0


if __name__ == "__main__":
    sys.exit(main())
