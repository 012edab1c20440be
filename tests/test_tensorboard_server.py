"""A real TensorBoard, started on 127.0.0.1 against the demo's output, serves every tag we wrote."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from lightning_introspect.cli import main
from tests.helpers import read_events


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str, timeout: float = 5.0):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def _tensorboard_cmd() -> list[str]:
    exe = shutil.which("tensorboard", path=os.path.dirname(sys.executable)) or shutil.which("tensorboard")
    return [exe] if exe else [sys.executable, "-m", "tensorboard.main"]


@pytest.mark.slow
def test_tensorboard_serves_demo_tags(tmp_path):
    out = tmp_path / "runs"
    assert main(["demo", "--fast", "--epochs", "2", "--out", str(out), "--name", "demo"]) == 0
    written = read_events(str(out / "demo"))
    port = _free_port()
    proc = subprocess.Popen(
        [*_tensorboard_cmd(), "--logdir", str(out), "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        served: dict[str, set[str]] = {}
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # bounded: the server needs a few seconds to load the run
            try:
                for plugin in ("scalars", "images", "histograms", "text"):
                    tags = _get(port, f"/data/plugin/{plugin}/tags")
                    served[plugin] = {t for run in tags.values() for t in (run if isinstance(run, dict) else run)}
                if written["scalars"].keys() <= served["scalars"] and served["images"]:
                    break
            except OSError:
                pass
            time.sleep(1.0)
        assert set(written["scalars"]) <= served.get("scalars", set())
        assert set(written["images"]) <= served.get("images", set())
        assert set(written["histograms"]) <= served.get("histograms", set())
        assert {t.rsplit("/text_summary", 1)[0] for t in written["text"] if t.endswith("/text_summary")} <= {
            t.rsplit("/text_summary", 1)[0] for t in served.get("text", set())
        }
        assert any(t.startswith("introspect/") for t in served["scalars"])
        # one image actually downloads
        run = next(iter(_get(port, "/data/runs")), None)
        tag = next(iter(written["images"]), None)
        if run is not None and tag is not None:
            query = urllib.parse.urlencode({"run": run, "tag": tag, "sample": 0})
            items = _get(port, f"/data/plugin/images/images?{query}")
            assert items, f"no image entries served for {tag}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
