"""``make lab``: the command it runs (``mergelib lab``) starts JupyterLab on ``notebooks/`` and
serves the chapters (start, request the tree and the contents listing, stop)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mergelib.report.book import NOTEBOOK_DIR, NOTEBOOKS, PROJECT_CACHE, lab_command, lab_environment

ROOT = Path(__file__).resolve().parents[2]


def test_make_lab_runs_mergelib_lab():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^lab: setup data\n\t\$\(BIN\)/mergelib lab\s*$", makefile, re.MULTILINE), "make lab target"


def test_lab_command_and_environment():
    command = lab_command(port=9999, open_browser=False, token="t")
    assert Path(command[0]).name == "jupyter-lab" and Path(command[0]).parent == Path(sys.executable).parent
    as_root = ["--allow-root"] if os.geteuid() == 0 else []
    assert command[1:] == [f"--notebook-dir={NOTEBOOK_DIR}", "--port=9999", "--no-browser", "--IdentityProvider.token=t",
                           *as_root]
    assert lab_environment({})["MERGELIB_CACHE"] == str(PROJECT_CACHE)
    assert lab_environment({"MERGELIB_CACHE": "/elsewhere"})["MERGELIB_CACHE"] == "/elsewhere"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str, token: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, response.read()


@pytest.mark.slow
def test_mergelib_lab_serves_the_chapters(tmp_path):
    port, token = _free_port(), "mergelib-test-token"
    environment = lab_environment()
    # keep JupyterLab's runtime files, settings and workspaces out of the user's folders
    for variable, folder in (("JUPYTER_RUNTIME_DIR", "runtime"), ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                             ("JUPYTERLAB_WORKSPACES_DIR", "workspaces")):
        environment[variable] = str(tmp_path / folder)
    command = [str(Path(sys.executable).with_name("mergelib")), "lab", "--port", str(port), "--no-browser", "--token", token]
    log = (tmp_path / "lab.log").open("w")
    server = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, listing = time.monotonic() + 90, None
        while listing is None:
            assert server.poll() is None, (tmp_path / "lab.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "JupyterLab did not answer within 90 s"
            try:
                status, body = _get(f"{base}/api/contents", token)
                listing = json.loads(body)
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        served = {item["name"] for item in listing["content"]}
        assert {f"{entry.name}.ipynb" for entry in NOTEBOOKS} <= served, served
        status, body = _get(f"{base}/lab/tree/{NOTEBOOKS[0].name}.ipynb", token)  # the page a student opens
        assert status == 200 and b"JupyterLab" in body
        with pytest.raises(urllib.error.HTTPError):  # and nobody without the token gets in
            urllib.request.urlopen(f"{base}/api/contents", timeout=5)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    assert server.returncode is not None
