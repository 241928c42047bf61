"""A sweep on a real local Ray head (loopback only) gives exactly the local executor's results.

Starts ``ray start --head --block`` in its own process group on a free port, runs a small sweep through
``--executor ray``, stops the head (its process group) at the end. Together with the 1-vs-2-worker test in
test_experiments.py this shows the same sweep gives identical matrices in-process, in a pool and on Ray.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from retain.cli import main
from retain.store import Store

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="Ray is not installed (pip install 'retain[ray]')")

# Ray turns 127.0.0.1 into the machine's routable address unless "clusters" are disabled: keep it on loopback.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path, monkeypatch):
    ray_bin = Path(sys.executable).parent / "ray"
    if not ray_bin.exists():
        pytest.skip("the `ray` command is not next to this Python")
    for k, v in LOOPBACK_ENV.items():
        monkeypatch.setenv(k, v)
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    port = _free_port()
    log = open(tmp_path / "head.log", "w+")
    env = dict(os.environ, OMP_NUM_THREADS="1", **LOOPBACK_ENV)
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                             "--num-cpus", "2", "--include-dashboard=false", "--disable-usage-stats",
                             "--temp-dir", temp, "--block"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "will now block" not in (tmp_path / "head.log").read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail("ray head did not start:\n" + (tmp_path / "head.log").read_text()[-2000:])
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(head.pid, sig)  # the head and everything it started: our process group only
            except ProcessLookupError:
                break
            try:
                head.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # stragglers of the group (workers) after the head exited
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_sweep_on_ray_matches_local(ray_head, tmp_path, capsys):
    f = tmp_path / "s.toml"
    f.write_text('name = "ray"\nbenchmark = "split-digits"\nn_tasks = 3\nepochs = 1\nseeds = 2\n'
                 '[[methods]]\nname = "er"\n[methods.params]\nbuffer_size = [10, 50]\n')
    ray_db, local_db = tmp_path / "ray.db", tmp_path / "local.db"
    assert main(["sweep", str(f), "--executor", "ray", "--address", ray_head, "--store", str(ray_db),
                 "--quiet"]) == 0
    assert main(["sweep", str(f), "--workers", "1", "--store", str(local_db), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.count("Chosen (best validation") == 2
    with Store(ray_db) as a, Store(local_db) as b:
        ra = {r["hash"]: r for r in a.runs()}
        rb = {r["hash"]: r for r in b.runs()}
    assert len(ra) == 4 and ra.keys() == rb.keys()
    for h in ra:
        assert ra[h]["status"] == "done", ra[h]["error"]
        assert ra[h]["accuracy_matrix"] == rb[h]["accuracy_matrix"]
        assert ra[h]["val_matrix"] == rb[h]["val_matrix"]
        assert ra[h]["pid"] == rb[h]["pid"] == os.getpid()  # the driver wrote every record
