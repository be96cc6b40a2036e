"""A real deployment on 127.0.0.1: stock Flower processes, TLS and SuperNode authentication.

The coordinator makes a CA and a SuperLink certificate, prepares the federation store and starts
`flower-superlink` with TLS and `--enable-supernode-auth`; two partner sites make ECDSA keys,
the coordinator registers their public keys, and each site starts a stock `flower-supernode`
whose node config names its data. `flwr run` runs a 2-round federation. Strangers are turned
away: a SuperNode whose key was never registered, and one without a key (which would register
itself, were SuperNode authentication off).

Every command is one of the COMMANDS below, run by bash with the guide's variables set, and
each of them appears word for word in docs/deployment.md (checked first), so the guide shows
exactly what this test runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.deployment

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "deployment.md"
# freeze_stages: each site keeps its initial weights as strategy memory beside its own data
OVERRIDES = "federation=smoke rounds=2 strategy.freeze_stages=2"
SITES = {"site-a": 0, "site-b": 1}  # site name -> partition-id (alpha, beta of federation=smoke)

COMMANDS = {
    "tls": 'deploy/tls-certificates.sh "$FED/certs" "DNS:localhost,IP:127.0.0.1"',
    "prepare": 'snowfed prepare "$FED/store" $OVERRIDES',
    "superlink": (
        'flower-superlink --ssl-ca-certfile "$FED/certs/ca.crt" --ssl-certfile "$FED/certs/server.pem" '
        '--ssl-keyfile "$FED/certs/server.key" --enable-supernode-auth '
        '--disable-runtime-dependency-installation --host "$SUPERLINK_HOST" --port "$SUPERLINK_PORT"'
    ),
    "connection": (
        'mkdir -p "$FLWR_HOME"\n'
        'cat > "$FLWR_HOME/config.toml" <<EOF\n'
        '[superlink]\n'
        'default = "coordinator"\n'
        '\n'
        '[superlink.coordinator]\n'
        'address = "$SUPERLINK"\n'
        'root-certificates = "$FED/certs/ca.crt"\n'
        'EOF'
    ),
    "key": 'deploy/supernode-key.sh "$SITE/keys" supernode',
    "register": 'flwr supernode register "$FED/public-keys/$SITE_NAME.pub" coordinator --name "$SITE_NAME"',
    "list": "flwr supernode list coordinator --format json",
    "supernode": (
        'flower-supernode --superlink "$SUPERLINK" --root-certificates "$SITE/ca.crt" '
        '--auth-supernode-private-key "$SITE/keys/supernode" '
        "--node-config \"data-path='$SITE/data' data-format='snowfed-store' partition-id=$PARTITION\" "
        '--port "$NODE_PORT"'
    ),
    "supernode-without-key": (
        'flower-supernode --superlink "$SUPERLINK" --root-certificates "$SITE/ca.crt" '
        "--node-config \"data-path='$SITE/data' data-format='snowfed-store' partition-id=$PARTITION\" "
        '--port "$NODE_PORT"'
    ),
    "run": (
        "flwr run . coordinator --stream --run-config "
        "\"overrides='$OVERRIDES' run-dir='$RUN_DIR' store='$FED/store'\""
    ),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), children before their own children."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class Processes:
    """Long-running processes of one test, each in its own session, logged to a file; `stop`
    ends each one with every process it started (Flower's SuperExec starts a session of its own,
    so the process tree is walked, not only the process group)."""

    def __init__(self, log_dir: Path, env: dict[str, str]):
        self.log_dir, self.env = log_dir, env
        self.procs: dict[str, subprocess.Popen] = {}
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, command: str, **env: str) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=REPO,
                                    env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str, chars: int = 4000) -> str:
        path = self.log_dir / f"{name}.log"
        return f"--- {name}.log ---\n" + (path.read_text(errors="replace")[-chars:] if path.exists() else "")

    def logs(self) -> str:
        return "\n".join(self.log(name, 2500) for name in self.procs)

    def stop(self) -> None:
        """SIGTERM to each process, its group and every process below it (SuperNodes first);
        SIGKILL to what is left after 10 s."""
        trees = {}
        for proc in reversed(list(self.procs.values())):
            trees[proc.pid] = [proc.pid, *_descendants(proc.pid)]
            _signal_group(proc.pid, signal.SIGTERM)
            _signal(trees[proc.pid], signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for t in trees.values() for p in t):
            time.sleep(0.2)
        for leader, tree in trees.items():
            _signal_group(leader, signal.SIGKILL)
            _signal(tree, signal.SIGKILL)
        for proc in self.procs.values():
            proc.wait(timeout=10)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    """Running, not a zombie (a zombie child of ours is reaped by its Popen's wait)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture
def deployment(tmp_path):
    bin_dir = Path(sys.executable).parent
    for tool in ("flwr", "flower-superlink", "flower-supernode", "snowfed"):
        if not (bin_dir / tool).exists():
            pytest.fail(f"{tool} is not installed beside {sys.executable}")
    port = _free_port()
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FED": str(tmp_path / "coordinator"),
        "FLWR_HOME": str(tmp_path / "coordinator" / "flwr-home"),
        "SUPERLINK_HOST": "127.0.0.1",
        "SUPERLINK_PORT": str(port),
        "SUPERLINK": f"127.0.0.1:{port}",
        "OVERRIDES": OVERRIDES,
        "RUN_DIR": str(tmp_path / "coordinator" / "runs" / "first"),
        # the installed snowfed runs the apps; never `uv sync` a fresh environment per run
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    procs = Processes(tmp_path / "logs", env)
    try:
        yield procs
    finally:
        procs.stop()


def _bash(command: str, env: dict[str, str], timeout: float = 120, **extra: str) -> str:
    proc = subprocess.run(["bash", "-c", command], cwd=REPO, env={**env, **extra},
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _site_env(tmp_path: Path, name: str) -> dict[str, str]:
    return {"SITE": str(tmp_path / name), "SITE_NAME": name,
            "FLWR_HOME": str(tmp_path / name / "flwr-home")}


def _supernodes(env: dict[str, str]) -> list[dict]:
    out = _bash(COMMANDS["list"], env, timeout=60)
    return json.loads(out[out.index("{"):])["nodes"]


def _wait(predicate, timeout: float, what: str, logs) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{logs()}")
        time.sleep(1.0)


def test_guide_shows_the_commands_this_test_runs():
    guide = GUIDE.read_text()
    for name, command in COMMANDS.items():
        assert command in guide, f"docs/deployment.md lacks the {name!r} command:\n{command}"


@pytest.mark.slow
def test_deployment_with_tls_and_supernode_auth(deployment, tmp_path):
    procs, env = deployment, deployment.env
    fed = Path(env["FED"])

    # coordinator: TLS credentials, the federation store, the SuperLink, the CLI's connection
    _bash(COMMANDS["tls"], env)
    _bash(COMMANDS["prepare"], env)
    superlink = procs.start("superlink", COMMANDS["superlink"])

    def listening() -> bool:
        assert superlink.poll() is None, f"the SuperLink exited\n{procs.log('superlink')}"
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", int(env["SUPERLINK_PORT"]))) == 0

    _wait(listening, 60, "the SuperLink to listen", procs.logs)
    _bash(COMMANDS["connection"], env)

    # each site: its key pair (the public key goes to the coordinator), the CA certificate and
    # its data (the rehearsal's store); the coordinator registers the two partners' keys only
    (fed / "public-keys").mkdir()
    for name in [*SITES, "intruder"]:
        site = _site_env(tmp_path, name)
        _bash(COMMANDS["key"], env, **site)
        shutil.copy(fed / "certs" / "ca.crt", tmp_path / name / "ca.crt")
        shutil.copytree(fed / "store", tmp_path / name / "data")
        shutil.copy(tmp_path / name / "keys" / "supernode.pub", fed / "public-keys" / f"{name}.pub")
    for name in SITES:
        _bash(COMMANDS["register"], env, SITE_NAME=name)
    registered = {n["node-id"] for n in _supernodes(env)}
    assert len(registered) == len(SITES)

    for name, partition in {**SITES, "intruder": 0}.items():
        procs.start(name, COMMANDS["supernode"], **_site_env(tmp_path, name),
                    PARTITION=str(partition), NODE_PORT=str(_free_port()))
    procs.start("anonymous", COMMANDS["supernode-without-key"], **_site_env(tmp_path, "intruder"),
                PARTITION="1", NODE_PORT=str(_free_port()))

    def partners_online() -> bool:
        return registered <= {n["node-id"] for n in _supernodes(env) if n["status"] == "online"}

    _wait(partners_online, 90, "both partner SuperNodes to be online", procs.logs)

    # strangers are turned away, each exiting with Flower's connection error (exit code 305):
    # an unregistered key cannot activate a node; without a key a SuperNode would register
    # itself, which SuperNode authentication forbids. The federation keeps its two nodes.
    refusals = {"intruder": ("Failed to activate SuperNode",
                             "No SuperNode found with the given public key"),
                "anonymous": ("SuperNode authentication is enabled. All SuperNodes must be "
                              "registered via the CLI", "/v1/fleet/register-node][ApiError:2001]")}
    for name, (node_says, superlink_says) in refusals.items():
        try:
            procs.procs[name].wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"SuperNode {name} was not refused\n{procs.logs()}")
        assert procs.procs[name].returncode != 0, procs.log(name)
        assert node_says in procs.log(name, 100_000), procs.log(name)
        assert superlink_says in procs.log("superlink", 1_000_000), procs.log("superlink")
    nodes = {n["node-id"]: n["status"] for n in _supernodes(env)}
    assert nodes == dict.fromkeys(registered, "online"), f"the SuperLink let others in: {nodes}"

    # the federation: 2 rounds with both partners, run by the stock processes
    run_dir = Path(env["RUN_DIR"])
    run = subprocess.run(["bash", "-c", COMMANDS["run"]], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=480)
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}\n{procs.logs()}"
    summary_path = run_dir / "summary.json"
    assert summary_path.exists(), f"no summary.json\n{run.stdout[-4000:]}\n{procs.logs()}"
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "completed", summary.get("reason")
    assert summary["rounds"] == 2 and [h["round"] for h in summary["history"]] == [0, 1, 2]
    assert set(summary["nodes"]) == {"alpha", "beta"}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = {(r["round"], r["node"]) for r in records
               if r["scope"] == "node" and r.get("phase") == "train" and "error" not in r}
    assert trained == {(rnd, node) for rnd in (1, 2) for node in ("alpha", "beta")}
    evaluated = {(r["round"], r["node"]) for r in records
                 if r["scope"] == "node" and r.get("phase") == "evaluate" and "error" not in r}
    assert evaluated == trained
    # each site read the data its own node config names (the server sends no store path): its
    # strategy memory lies beside its own copy of the data, none in the coordinator's store
    for name, partition in SITES.items():
        assert list((tmp_path / name / "data" / "node-memory" / str(partition)).glob("*.pt")), name
    assert not (fed / "store" / "node-memory").exists()
    assert not (tmp_path / "intruder" / "data" / "node-memory").exists()
