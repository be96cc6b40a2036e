"""A warm simulation (`snowfed serve`, snowfed.sim.run.warm): a run handed to it equals a cold
run; Ctrl-C in the submitting command stops that run, not the server; other sites or Ray
resources are refused by name; `--stop` ends it; a crashed server's socket makes runs cold."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snowfed.config import compose, plain_config
from snowfed.sim.run.warm import WarmServer, _listen, submit

SNOWFED = [sys.executable, "-c", "from snowfed.cli import console; console()"]


def _records(run_dir: Path, scope: str) -> list[str]:
    drop = ("time", "duration_s", "wall_s", "ray-node")  # a Ray session's own node id
    return sorted(json.dumps({k: v for k, v in json.loads(line).items() if k not in drop}, sort_keys=True)
                  for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line)["scope"] == scope)


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 120.0) -> str:
    seen, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        seen += line
        if text in line:
            return seen
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"{text!r} not seen: {seen}")


def test_an_idle_server_stops_by_itself(tmp_path):
    server = WarmServer(plain_config(compose(["federation=smoke"])), 2, idle_s=0.5,
                        path=tmp_path / "warm.sock")
    listener = _listen(server.path)
    start = time.monotonic()
    server._accept(listener, grid=None)  # no run comes: it returns once idle
    listener.close()
    assert 0.5 <= time.monotonic() - start < 5


@pytest.mark.slow
def test_a_warm_run_equals_a_cold_run_and_ctrl_c_stops_it_not_the_server(tmp_path):
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path / "user")}
    cold_env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path / "nobody")}
    run = ["run", "federation=smoke", "rounds=2", "seed=3", "strategy.local_steps=5"]
    cold = subprocess.run([*SNOWFED, *run, f"run_dir={tmp_path / 'cold'}"], env=cold_env,
                          capture_output=True, text=True, timeout=300)
    assert cold.returncode == 0, cold.stderr[-2000:]
    server = subprocess.Popen([*SNOWFED, "serve", "federation=smoke", "--idle", "300"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(server, "snowfed serve: ready")
        # the command itself: checked by the server, run there, and torch never imported here
        command = ("import sys; from snowfed.cli import main; code = main(sys.argv[1:]); "
                   "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(code)")
        warm = subprocess.run([sys.executable, "-c", command, *run, f"run_dir={tmp_path / 'warm'}"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert warm.returncode == 0, warm.stderr[-2000:]
        assert "no torch" in warm.stdout and "running in the warm simulation" in warm.stderr
        for scope in ("global", "node"):  # bit for bit, whether it ran warm or not
            assert _records(tmp_path / "warm", scope) == _records(tmp_path / "cold", scope)

        bad = subprocess.run([*SNOWFED, *run, "strategy.lr=-1", f"run_dir={tmp_path / 'bad'}"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and "strategy.lr" in bad.stderr and not (tmp_path / "bad").exists()

        # other Ray resources per site: refused by name, and the command would run it cold
        said = []
        other = plain_config(compose([*run[1:], "backend.client_resources.num_cpus=2"]))
        sock = Path(env["XDG_RUNTIME_DIR"]) / f"snowfed-{os.getuid()}" / "warm.sock"
        assert submit(other, tmp_path / "other", lambda *a: None, said.append, path=sock) is None
        assert "backend.client_resources.num_cpus 1.0 (this run: 2.0)" in said[0] and "cold" in said[0]

        # Ctrl-C in the submitting command: that run ends interrupted, the server goes on
        long = subprocess.Popen([*SNOWFED, "run", "federation=smoke", "rounds=40", "seed=1",
                                 f"run_dir={tmp_path / 'long'}"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        while not (tmp_path / "long" / "checkpoint.pt").exists():
            assert long.poll() is None, long.stdout.read()
            time.sleep(0.2)
        long.send_signal(signal.SIGINT)
        out, _ = long.communicate(timeout=120)
        summary = json.loads((tmp_path / "long" / "summary.json").read_text())
        assert summary["status"] == "interrupted" and summary["rounds"] < 40, out
        assert server.poll() is None
        again = subprocess.run([*SNOWFED, *run, f"run_dir={tmp_path / 'again'}"], env=env,
                               capture_output=True, text=True, timeout=300)
        assert again.returncode == 0 and _records(tmp_path / "again", "global") == _records(
            tmp_path / "cold", "global"), again.stderr[-2000:]

        stopped = subprocess.run([*SNOWFED, "serve", "--stop"], env=env, capture_output=True,
                                 text=True, timeout=60)
        assert "stopped" in stopped.stdout
        server.wait(timeout=120)
        assert not sock.exists()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_a_crashed_servers_socket_makes_the_run_cold(tmp_path):
    """A socket nobody listens on (its server was killed): submit says nothing and hands the
    run back; a new server takes the path over."""
    path = tmp_path / "warm.sock"
    listener = _listen(path)
    listener.close()  # the socket file stays, as after a kill -9
    assert path.exists()
    cfg = plain_config(compose(["federation=smoke"]))
    said = []
    assert submit(cfg, tmp_path / "run", lambda *a: None, said.append, path=path) is None
    assert said == [] and not (tmp_path / "run").exists()
    _listen(path).close()  # the next `snowfed serve` replaces the dead socket
