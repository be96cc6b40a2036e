"""A warm simulation that outlives one command: `snowfed serve` keeps Ray, the actor pool (with
its imports) and a ServerApp waiting for runs; `snowfed run` hands its run to it when one serves
this user with the run's number of sites and Ray resources, and otherwise runs cold, as before.

A warm run is a sweep job that arrives later (sim.run.sweep): it runs in a thread of the
ServerApp on the one Grid with its own randomness (server.app.RunRandomness), so its results
equal a cold run's. The server listens on a Unix socket in a folder only its user can open
(0700); a message is one JSON line. It stops after `idle_s` without a run, on `snowfed serve
--stop`, on Ctrl-C, or with its simulation. A socket left by a crashed server refuses the
connection, and `snowfed run` then runs cold.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

from snowfed.config import REFERENCE_AGGREGATIONS as REFERENCES
from snowfed.config import ConfigError

# The command's side (`check`, `submit`, `stop_server`) imports nothing heavy: a warm run's
# command never imports torch or Flower, which are most of a cold start; the server's side
# imports them where it starts.
IDLE_S = 1800.0  # a server with no run for this long stops (`snowfed serve --idle`)


def socket_path() -> Path:
    """Where this user's warm simulation listens: $XDG_RUNTIME_DIR, else the temp folder."""
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    return base / f"snowfed-{os.getuid()}" / "warm.sock"


def resources(cfg: Mapping[str, Any], num_sites: int) -> dict[str, Any]:
    """What a run must share with a warm simulation: its sites (Flower's SuperNodes are fixed
    when a simulation starts), the Ray resources and init arguments of its backend, and the
    cluster it attaches to (none: a private Ray)."""
    from snowfed.sim.run.plan import backend_config, cluster_address

    return {"sites": num_sites, "backend": {**backend_config(cfg["backend"]),
                                            "address": cluster_address(cfg["backend"])}}


def _differences(have: Mapping[str, Any], want: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(have.keys() | want.keys()):
        a, b = have.get(key), want.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} (this run: {b!r})")
    return out


class WarmServer:
    """`snowfed serve`: one simulation of `resources["sites"]` SuperNodes whose ServerApp runs
    the runs it is sent, each in a thread, until it is stopped or idle for `idle_s`."""

    def __init__(self, cfg: Mapping[str, Any], num_sites: int, idle_s: float = IDLE_S,
                 path: Path | None = None):
        self.cfg, self.num_sites, self.idle_s = dict(cfg), num_sites, idle_s
        self.resources = resources(cfg, num_sites)
        self.path = path or socket_path()
        self.stop = threading.Event()  # the server's end: Ctrl-C, --stop or idle
        self.lock = threading.Lock()
        self.runs: set[threading.Event] = set()  # the stop of each run in flight
        self.last_run = time.monotonic()

    def serve(self, on_ready: Callable[[], None] | None = None) -> None:
        """Listen, start the simulation and serve until stopped; the socket is gone after."""
        from flwr.serverapp import ServerApp

        from snowfed.sim.run.engine import run_engine

        listener = _listen(self.path)
        server_app = ServerApp()

        @server_app.main()
        def main(grid, context) -> None:
            self._warm_up(grid)
            if on_ready is not None:
                on_ready()
            self._accept(listener, grid)

        try:
            run_engine(server_app, self.num_sites, self.cfg, stop=self.stop)
        finally:
            listener.close()
            self.path.unlink(missing_ok=True)

    def _warm_up(self, grid) -> None:
        """One round of the served config, thrown away: the actors' first-message work (a
        store's nodes, torch's imports at the first optimiser step) is then done before the
        first run comes, not during it (docs/benchmarks.md, "A warm simulation"). A run's
        results do not depend on it (tests/test_warm.py)."""
        from snowfed.server.app import run_federation
        from snowfed.sim.run.runner import run

        def federate(cfg, plan, store, run_dir, on_round):
            return run_federation(grid, cfg, store, run_dir, on_round, stop=self.stop)

        with tempfile.TemporaryDirectory(prefix="snowfed-warm-up-") as tmp:
            cfg = {**self.cfg, "rounds": 1, "personalize_steps": 0, "logger": {"name": "none"},
                   "run_dir": str(Path(tmp) / "run")}
            run(cfg, Path(tmp) / "run", federate=federate, quiet=True)

    def _accept(self, listener: socket.socket, grid) -> None:
        listener.settimeout(0.2)
        while not self.stop.is_set():
            with self.lock:
                if not self.runs and time.monotonic() - self.last_run > self.idle_s:
                    break
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._answer, args=(conn, grid), daemon=True,
                             name="snowfed-warm-run").start()
        with self.lock:  # runs in flight stop at their next wait for replies, summaries written
            for run_stop in self.runs:
                run_stop.set()
        while self.runs:
            time.sleep(0.1)

    def _answer(self, conn: socket.socket, grid) -> None:
        try:
            with conn, conn.makefile("rw", encoding="utf-8") as stream:
                message = json.loads(stream.readline() or "{}")
                if message.get("op") == "shutdown":
                    self.stop.set()
                    _send(stream, {"event": "stopping"})
                elif message.get("op") == "check":
                    _send(stream, self._check(message["cfg"])[0])
                elif message.get("op") == "run":
                    self._run(message, stream, grid)
        except (OSError, ValueError):  # the command left (or sent no JSON): nothing to answer
            pass

    def _check(self, cfg: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """(the answer to the command, the run's plan): `ok`, `bad` (the config error's one
        line: the command exits 2) or `refused` (other sites or resources: it runs cold)."""
        from snowfed.data.common import DataError
        from snowfed.sim.run.plan import validate

        try:
            plan = validate(cfg)
        except (ConfigError, DataError) as err:
            return {"event": "bad", "why": str(err)}, None
        differ = _differences(self.resources, resources(cfg, len(plan.hospitals)))
        if differ:
            return {"event": "refused", "why": f"it serves {'; '.join(differ)}"}, None
        return {"event": "ok"}, plan

    def _run(self, message: Mapping[str, Any], stream: TextIO, grid) -> None:
        from snowfed.server.app import run_federation
        from snowfed.server.transport import RunInterrupted
        from snowfed.sim.run.runner import run

        cfg, run_dir = dict(message["cfg"]), Path(message["run_dir"])
        answer, plan = self._check(cfg)
        if plan is None:
            _send(stream, answer)
            return
        run_stop = threading.Event()
        with self.lock:
            self.runs.add(run_stop)
        _send(stream, {"event": "accepted", "pid": os.getpid()})
        # a line from the command (its Ctrl-C), or its end (killed), stops this run alone
        threading.Thread(target=lambda: (stream.readline(), run_stop.set()), daemon=True).start()

        def federate(cfg, plan, store, run_dir, on_round):
            return run_federation(grid, cfg, store, run_dir, on_round, stop=run_stop)

        def on_round(rnd: int, global_metrics: dict, node_f1: dict[str, float]) -> None:
            _send(stream, {"event": "round", "round": rnd, "global": global_metrics, "node_f1": node_f1})

        try:
            summary = run(cfg, run_dir, federate=federate, quiet=True, on_round=on_round, plan=plan)
            _send(stream, {"event": "done", "summary": summary})
        except RunInterrupted:
            _send(stream, {"event": "done", "summary": json.loads((run_dir / "summary.json").read_text())})
        except Exception as exc:  # noqa: BLE001 - the command reports it; the server goes on
            _send(stream, {"event": "crashed", "error": f"{type(exc).__name__}: {exc}"})
        finally:
            with self.lock:
                self.runs.discard(run_stop)
                self.last_run = time.monotonic()


def _listen(path: Path) -> socket.socket:
    """A Unix socket at `path`, its folder this user's alone; a live server there refuses."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    if path.exists():
        if _connect(path) is not None:
            raise ConfigError("serve", str(path), "no other warm simulation of this user "
                              "(stop it first: snowfed serve --stop)")
        path.unlink()  # a crashed server's
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    return listener


def _connect(path: Path) -> socket.socket | None:
    if not path.exists():
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:  # nobody listens: a crashed server's socket
        conn.close()
        return None
    return conn


def _send(stream: TextIO, message: Mapping[str, Any]) -> None:
    try:
        stream.write(json.dumps(message) + "\n")
        stream.flush()
    except (OSError, ValueError):  # the command is gone; its run stops (the reader saw EOF)
        pass


def _server_for(cfg: Mapping[str, Any], path: Path | None) -> socket.socket | None:
    """A connection to this user's warm simulation for a federated run; None without one."""
    if cfg["aggregation"]["name"] in REFERENCES:  # not federated: it runs in the command
        return None
    return _connect(path or socket_path())


def submit(cfg: Mapping[str, Any], run_dir: Path, on_round: Callable[[int, dict, dict], None],
           say: Callable[[str], None], path: Path | None = None) -> dict[str, Any] | None:
    """Run `cfg` in this user's warm simulation; its summary, or None when none serves it (no
    server, a crashed one, a reference aggregation, or other sites or resources: `say` tells
    why), and the caller runs it cold. Ctrl-C stops the run, not the server."""
    conn = _server_for(cfg, path)
    if conn is None:
        return None
    with conn, conn.makefile("rw", encoding="utf-8") as stream:
        _send(stream, {"op": "run", "cfg": dict(cfg), "run_dir": str(Path(run_dir).resolve())})
        stopping = False
        while True:
            try:
                line = stream.readline()
            except KeyboardInterrupt:
                if stopping:  # a second Ctrl-C leaves now; the server sees the socket close
                    raise
                stopping = True
                _send(stream, {"op": "stop"})
                say("snowfed: stopping this run after the client tasks in hand (Ctrl-C again to "
                    "leave at once; the warm simulation goes on)")
                continue
            if not line:
                raise RuntimeError("the warm simulation ended during the run (its run directory "
                                   f"{run_dir} holds every completed round: snowfed run resume=DIR)")
            event = json.loads(line)
            if event["event"] == "accepted":
                say(f"snowfed: running in the warm simulation (snowfed serve, pid {event['pid']}); "
                    "Ctrl-C stops this run only")
            elif event["event"] == "round":
                on_round(event["round"], event["global"], event["node_f1"])
            elif event["event"] in ("refused", "bad"):
                say(f"snowfed: the warm simulation does not take this run ({event['why']}); "
                    "running it cold")
                return None
            elif event["event"] == "crashed":
                raise RuntimeError(event["error"])
            else:
                return event["summary"]


def check(cfg: Mapping[str, Any], path: Path | None = None) -> dict[str, Any] | None:
    """The warm simulation's check of `cfg` (its answer: `ok`, `bad` with the config error's
    line, or `refused` with what differs), done where torch and the data are loaded already;
    None when no server is listening or the run is not one it would take."""
    conn = _server_for(cfg, path)
    if conn is None:
        return None
    with conn, conn.makefile("rw", encoding="utf-8") as stream:
        _send(stream, {"op": "check", "cfg": dict(cfg)})
        line = stream.readline()
    return json.loads(line) if line else None


def stop_server(path: Path | None = None) -> bool:
    """Ask this user's warm simulation to stop; False when none is running."""
    conn = _connect(path or socket_path())
    if conn is None:
        return False
    with conn, conn.makefile("rw", encoding="utf-8") as stream:
        _send(stream, {"op": "shutdown"})
        stream.readline()
    return True
