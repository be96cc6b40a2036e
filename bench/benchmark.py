"""`snowfed bench`: snowfed against stock Flower and a plain PyTorch loop, side by side.

Three ways to do the same work, each in a fresh Python process (imports, Ray start and the data
build are paid by each, as a user would pay them; `--quick` lets some processes serve two rows,
see `plan`):

- a, snowfed: what `snowfed run` runs (the config validated, then the run), or a sweep
  (`snowfed run -m`: one simulation for all runs);
- b, stock Flower (bench.flower_app): written the way Flower's PyTorch quickstart is, on
  Flower's simulation engine: FedAvg's `start`, the model and the node's data made inside every
  client call, one `run_simulation` per run;
- c, the floor: one process, no Flower, no Ray: each round the same sampled sites run the same
  local steps one after another, then the same weighted average and evaluations.

All three build the same federation store with snowfed's `prepare` and train with snowfed's
local strategy and trainer, so the ratios measure the federation machinery, not different
training code. Workloads: W1 (8 sites, segmentation, 64x64 tiles, ~1 s of local work per site per
round), W2 (100 sites, 10 per round, small CNN, 10 SGD steps), S (12 runs of W2's shape, 5 rounds
each), C (a sweep of 4 runs of W1's shape, 3 rounds each, with backend=cluster: on a local Ray
cluster of two 1-CPU nodes, and on one such node alone; the cluster is running before the
process starts, as a user's is) and MEM (one dataset split into 10, 100 and 1000 sites:
snowfed's peak memory).

Memory is the peak of the summed proportional set size (PSS, Linux: shared pages split between
the processes that map them) of the process and all its descendants (Ray's raylet, GCS and
workers included), sampled every 0.2 s. Times are wall clock: total, until the first round is
evaluated, and per round after it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

WORKLOADS = ("W1", "W2", "S", "C", "MEM")
VARIANTS = ("a", "b", "c", "w")
QUICK_IMAGES, FULL_IMAGES = 5_000, 30_000  # the W2/S/MEM data file (synthetic_npz)
COLD = ("a", "b", "c")  # w: snowfed handing each run to a warm simulation (W2 and S only)


def synthetic_npz(path: Path, num_images: int, size: int = 28, seed: int = 0) -> Path:
    """A MedMNIST-layout classification file made from scikit-learn's bundled digits: each image
    a digit scaled to ~3/4 of the tile at a random place, tinted, with sensor noise (learnable,
    and as large as the workload needs; nothing is downloaded)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(digits.images), num_images)
    scale = max(1, (size * 3 // 4) // 8)
    glyphs = np.kron(digits.images[pick] / 16.0, np.ones((scale, scale)))  # (N, 8s, 8s)
    images = np.zeros((num_images, size, size), dtype=np.float32)
    room = size - glyphs.shape[1]
    dy, dx = rng.integers(0, room + 1, num_images), rng.integers(0, room + 1, num_images)
    for i in range(num_images):
        images[i, dy[i] : dy[i] + glyphs.shape[1], dx[i] : dx[i] + glyphs.shape[2]] = glyphs[i]
    tint = rng.uniform(0.5, 1.0, (num_images, 1, 1, 3)).astype(np.float32)
    rgb = images[..., None] * tint + rng.normal(0, 0.08, (num_images, size, size, 3))
    rgb = np.clip(rgb * 255, 0, 255).astype(np.uint8)
    labels = digits.target[pick].astype(np.int64)[:, None]
    cut = [int(num_images * 0.8), int(num_images * 0.9)]
    parts = dict(zip(("train", "val", "test"), np.split(np.arange(num_images), cut)))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{f"{k}_images": rgb[v] for k, v in parts.items()},
             **{f"{k}_labels": labels[v] for k, v in parts.items()})
    return path


@dataclass(frozen=True)
class Workload:
    overrides: tuple[str, ...]
    runs: int = 1  # S: a sweep of this many runs (seeds 0..runs-1)

    def jobs(self) -> list[tuple[str, ...]]:
        """Each run's overrides."""
        return [(*self.overrides, f"seed={seed}") for seed in range(self.runs)]


def workloads(quick: bool, data: Path) -> dict[str, Workload]:
    """The benchmark's runs as snowfed overrides. --quick keeps each workload's shape, fewer
    rounds, steps and runs; its S runs are W2's run with seeds 0 and 1 (see `plan`)."""
    w1_steps, w1_rounds, c_rounds = (2, 1, 1) if quick else (12, 10, 3)
    w2_rounds, s_runs, s_rounds = (2, 2, 2) if quick else (30, 12, 5)
    many = ["task=classification", "dataset=npz", f"dataset.path={data}", "model=smallcnn", "model.width=8",
            "federation=many_sites", "federation.partition.scheme=iid",
            "aggregation.fraction_train=0.1", "aggregation.fraction_evaluate=0.1",
            "strategy.optimizer=sgd", "strategy.lr=0.05", "strategy.local_steps=10",
            "strategy.batch_size=32"]
    return {
        "W1": Workload(("federation=cross_silo", f"strategy.local_steps={w1_steps}",
                        f"rounds={w1_rounds}")),
        "W2": Workload((*many, f"rounds={w2_rounds}")),
        "S": Workload((*many, f"rounds={s_rounds}"), runs=s_runs),
        "C": Workload(("federation=cross_silo", f"strategy.local_steps={w1_steps}",
                       f"rounds={c_rounds}"), runs=4),
    }


def mem_overrides(data: Path, sites: int, rounds: int, visit_all: bool = True) -> tuple[str, ...]:
    """MEM: 10 sites train per round; with `visit_all` every site evaluates every round, so every
    site's data and strategy are built in the actors (else only the sampled ones are)."""
    per_round = min(10, sites)
    evaluating = sites if visit_all else per_round
    return ("task=classification", "dataset=npz", f"dataset.path={data}", "model=smallcnn", "model.width=8",
            "federation=many_sites", "federation.partition.scheme=iid",
            f"federation.hospitals.count={sites}", "federation.val_fraction=0.2",
            f"aggregation.fraction_train={per_round / sites}",
            f"aggregation.fraction_evaluate={evaluating / sites}",
            "strategy.optimizer=sgd", "strategy.lr=0.05", "strategy.local_steps=10",
            "strategy.batch_size=32", f"rounds={rounds}")


# ---------------------------------------------------------------- the child process: one variant


def _configs(jobs: list[tuple[str, ...]], out: Path) -> list[tuple[dict, Path]]:
    from snowfed.config import compose, plain_config

    return [(plain_config(compose(list(job))), out / f"run{i}") for i, job in enumerate(jobs)]


def child(variant: str, jobs: list[tuple[str, ...]], sweep: bool, out: Path) -> dict[str, Any]:
    """Run one variant's jobs in this process, one after another (a with `sweep`: as one sweep);
    the times at which it saw each round and each run end."""
    ticks: list[float] = []  # time at the end of each evaluated round (round 0 excluded)
    run_ends: list[float] = []  # time at the end of each run (not in a sweep: its runs overlap)

    def tick(rnd: int, *_):
        if rnd > 0:
            ticks.append(time.monotonic())

    configs = _configs(jobs, out)
    if variant == "a" and sweep:
        from snowfed.sim.run.sweep import Job, run_sweep

        outcomes = run_sweep([Job(cfg, run_dir) for cfg, run_dir in configs],
                             stream=open(os.devnull, "w"))
        assert all(o.status == "completed" for o in outcomes), [o.error for o in outcomes]
    elif variant == "a":
        from snowfed.sim.run.plan import validate
        from snowfed.sim.run.runner import run

        for cfg, run_dir in configs:
            plan = validate(cfg)  # as `snowfed run` does before it starts anything
            run(cfg, run_dir, quiet=True, on_round=tick, plan=plan)
            run_ends.append(time.monotonic())
    elif variant == "w":
        from snowfed.sim.run.warm import check, submit

        for cfg, run_dir in configs:
            assert check(cfg) == {"event": "ok"}  # as `snowfed run` has the server check it
            summary = submit(cfg, run_dir, tick, say=lambda line: print(line, file=sys.stderr))
            assert summary is not None and summary["status"] == "completed", summary
            run_ends.append(time.monotonic())
    else:
        if variant == "b":  # c imports nothing of the stock Flower app
            from snowfed.bench.flower_app import run_stock_flower as one_run
        else:
            from snowfed.bench.floor import plain_loop as one_run
        for cfg, run_dir in configs:
            one_run(cfg, run_dir, tick)
            run_ends.append(time.monotonic())
    return {"ticks": ticks, "run_ends": run_ends}


# ---------------------------------------------------------------- the parent: measure and compare


def _tree_pss_kb(root: int) -> int:
    """Summed PSS (kB) of `root` and its descendants, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


@dataclass
class Measured:
    wall_s: float
    first_round_s: float
    per_round_s: float
    peak_mb: float


@dataclass
class Process:
    """What one variant's process did: memory samples (time, kB), the child's round ticks and run
    ends, all in seconds from its spawn."""
    runs: int
    wall_s: float
    samples: list[tuple[float, int]]
    ticks: list[float]
    run_ends: list[float]

    def figures(self, run: int | None = None) -> Measured:
        """The whole process's figures; or those of one of its runs alone, from the end of the
        run before (run 0: from the spawn, as if the process had ended with it) to its own end."""
        start, end = 0.0, self.wall_s
        if run is not None:
            start, end = (self.run_ends[run - 1] if run else 0.0), self.run_ends[run]
        ticks = [t - start for t in self.ticks if start < t <= end]
        per_round = float("nan")  # several runs' rounds (a sweep's overlap): only wall time counts
        if (run is not None or self.runs == 1) and len(ticks) > 1:
            per_round = (ticks[-1] - ticks[0]) / (len(ticks) - 1)
        peak = max((kb for t, kb in self.samples if start <= t <= end), default=0)
        return Measured(end - start, ticks[0] if ticks else end - start, per_round, peak / 1024)


def measure(variant: str, jobs: list[tuple[str, ...]], out: Path, sweep: bool = False) -> Process:
    """Run one variant's jobs in a fresh process; its times and the memory of its process tree."""
    out.mkdir(parents=True, exist_ok=True)
    result, listed = out / "result.json", out / "jobs.json"
    listed.write_text(json.dumps(jobs))
    cmd = [sys.executable, "-m", "snowfed.bench.benchmark", "--child", variant, "--jobs", str(listed),
           "--out", str(out), *(["--sweep"] if sweep else [])]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(out / "stderr.log", "w"),
                            env={**os.environ, "SNOWFED_BENCH_RESULT": str(result),
                                 "SNOWFED_BENCH_START": str(start)})
    samples = []
    while proc.poll() is None:
        samples.append((time.monotonic() - start, _tree_pss_kb(proc.pid)))
        time.sleep(0.2)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"bench variant {variant} failed (exit {proc.returncode}); see "
                           f"{out / 'stderr.log'}:\n" + (out / "stderr.log").read_text()[-2000:])
    report = json.loads(result.read_text())
    return Process(len(jobs), wall, samples, [t - report["start"] for t in report["ticks"]],
                   [t - report["start"] for t in report["run_ends"]])


def benchmark(quick: bool, only: list[str], out: Path | None) -> int:
    """`snowfed bench`: measure the workloads in `only` (all of WORKLOADS by default); the runs
    go to `out`, or to a temporary folder that is removed."""
    unknown = [w for w in only if w not in WORKLOADS]
    if unknown:
        print(f"snowfed bench: --only {','.join(unknown)} is not a workload; choose among "
              f"{', '.join(WORKLOADS)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="snowfed-bench-") as tmp:
        return _bench(Path(out or tmp), only or list(WORKLOADS), quick)


def child_main(argv: list[str] | None = None) -> int:
    """One variant's process (`python -m snowfed.bench.benchmark --child V ...`, spawned by `measure`):
    it runs the jobs and writes what it measured where the parent said."""
    parser = argparse.ArgumentParser(prog="python -m snowfed.bench.benchmark")
    parser.add_argument("--child", choices=VARIANTS, required=True)
    parser.add_argument("--jobs", required=True)  # the child's runs: a JSON list of overrides
    parser.add_argument("--out", required=True)
    parser.add_argument("--sweep", action="store_true")
    opts = parser.parse_args(argv)
    started = float(os.environ["SNOWFED_BENCH_START"])  # the parent's clock at the spawn
    jobs = [tuple(job) for job in json.loads(Path(opts.jobs).read_text())]
    report = child(opts.child, jobs, opts.sweep, Path(opts.out))
    report["start"] = started
    Path(os.environ["SNOWFED_BENCH_RESULT"]).write_text(json.dumps(report))
    return 0


@dataclass(frozen=True)
class Spawn:
    """One process to measure: a variant's jobs, and the rows it gives (workload, variant label,
    and the run they come from; None: the whole process)."""
    variant: str
    jobs: list[tuple[str, ...]]
    rows: list[tuple[str, str, int | None]]
    sweep: bool = False
    cluster_nodes: int = 0  # C: the jobs run on a local Ray cluster of this many 1-CPU nodes


def plan(quick: bool, only: list[str], data: Path) -> list[Spawn]:
    """The processes that measure the workloads in `only`. The full benchmark gives each variant
    of each workload a fresh process. --quick spares five process start-ups: W1 has no b (no
    target needs it); its S runs are W2's run with seeds 0 and 1, so W2's b and c figures are
    those of the first run of S's b and c processes (each a fresh process whose first work is
    exactly W2's); MEM's two runs follow W2's run in W2's a process (each measured from the end
    of the run before it, so the two memory figures compare like with like)."""
    loads = workloads(quick, data)
    sites = (10, 1000) if quick else (10, 100, 1000)
    mem_jobs = [(*mem_overrides(data, n, 1 if quick else 2, visit_all=not quick), "seed=0") for n in sites]
    mem_rows = [("MEM", f"a {n}") for n in sites]
    shared = quick and {"W2", "S"} <= set(only)
    spawns: list[Spawn] = []
    if "W1" in only:
        spawns += [Spawn(v, loads["W1"].jobs(), [("W1", v, None)]) for v in ("ac" if quick else COLD)]
    if "W2" in only:
        for variant in ("a", "w") if shared else VARIANTS:
            jobs, rows = loads["W2"].jobs(), [("W2", variant, None)]
            if quick and variant == "a" and "MEM" in only:
                jobs = jobs + mem_jobs
                rows = [("W2", variant, 0), *((*row, 1 + i) for i, row in enumerate(mem_rows))]
            spawns.append(Spawn(variant, jobs, rows))
    if "S" in only:
        for variant in VARIANTS:
            rows = [("S", variant, None)]
            if shared and variant in "bc":
                rows.append(("W2", f"{variant} (S#0)", 0))
            spawns.append(Spawn(variant, loads["S"].jobs(), rows, sweep=variant == "a"))
    if "C" in only:
        spawns += [Spawn("a", loads["C"].jobs(), [("C", f"a {n} node{'s' * (n > 1)}", None)], sweep=True,
                         cluster_nodes=n) for n in (2, 1)]
    if "MEM" in only and not (quick and "W2" in only):
        if quick:
            spawns.append(Spawn("a", mem_jobs, [(*row, i) for i, row in enumerate(mem_rows)]))
        else:
            spawns += [Spawn("a", [job], [(*row, None)]) for job, row in zip(mem_jobs, mem_rows)]
    return spawns


@contextmanager
def warm_server(job: tuple[str, ...], out: Path) -> Iterator[None]:
    """A `snowfed serve` of the job's sites and backend for variant w, ready before the variant's
    process starts (its start is what a warm simulation spares the runs), stopped after; its
    socket under `out`, apart from the user's own."""
    from snowfed.sim.run.warm import stop_server

    out.mkdir(parents=True, exist_ok=True)
    before = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = str(out)  # the variant's process inherits it
    server = subprocess.Popen([sys.executable, "-c", "from snowfed.cli import console; console()",
                               "serve", *job, "--idle", "3600"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        for line in server.stdout:
            if "snowfed serve: ready" in line:
                break
        else:
            raise RuntimeError(f"snowfed serve did not start (exit {server.wait()})")
        yield
    finally:
        stop_server()
        server.wait(timeout=120)
        if before is None:
            os.environ.pop("XDG_RUNTIME_DIR", None)
        else:
            os.environ["XDG_RUNTIME_DIR"] = before


def _bench(root: Path, only: list[str], quick: bool) -> int:
    """Measure the workloads in `only` (see `plan`), a row per workload and variant as each
    process ends, then the ratios."""
    data = synthetic_npz(root / "data.npz", QUICK_IMAGES if quick else FULL_IMAGES)
    got: dict[str, dict[str, Measured]] = {}
    print(f"{'workload':8} {'variant':8} {'wall s':>8} {'first round s':>14} {'per round s':>12} "
          f"{'peak MB':>8}", flush=True)
    for i, spawn in enumerate(plan(quick, only, data)):
        where = root / f"{i}-{spawn.rows[0][0]}-{spawn.variant}"
        if spawn.variant == "w":
            with warm_server(spawn.jobs[0], where):
                process = measure(spawn.variant, spawn.jobs, where)
        elif spawn.cluster_nodes:
            from snowfed.bench.local_cluster import local_cluster

            with local_cluster(spawn.cluster_nodes, cpus_per_node=1) as cluster:
                attach = ("backend=cluster", f"backend.address={cluster.address}")
                process = measure(spawn.variant, [(*job, *attach) for job in spawn.jobs], where,
                                  spawn.sweep)
        else:
            process = measure(spawn.variant, spawn.jobs, where, spawn.sweep)
        for name, variant, run in spawn.rows:
            m = process.figures(run)
            got.setdefault(name, {})[variant] = m
            print(f"{name:8} {variant:8} {m.wall_s:8.1f} {m.first_round_s:14.1f} "
                  f"{m.per_round_s:12.3f} {m.peak_mb:8.0f}", flush=True)
    ratios: list[str] = []
    for name in (w for w in ("W1", "W2", "S") if w in only):
        figures = {variant.split()[0]: m for variant, m in got[name].items()}
        ratios.append(f"{name} a/c={figures['a'].wall_s / figures['c'].wall_s:.2f}")
        if name != "W1":
            ratios.append(f"{name} a/b={figures['a'].wall_s / figures['b'].wall_s:.2f}")
            warm, cold, floor = figures["w"], figures["a"], figures["c"]
            ratios.append(f"{name} warm first_round_s={warm.first_round_s:.1f} {name} warm "
                          f"a/c={warm.wall_s / floor.wall_s:.2f}")
            if name == "W2":  # S's a is one sweep, whose runs overlap: no first round of its own
                ratios.append(f"W2 cold first_round a/c={cold.first_round_s / floor.first_round_s:.2f}")
    if "C" in only:
        ratios.append(f"C 2 nodes/1 node={got['C']['a 2 nodes'].wall_s / got['C']['a 1 node'].wall_s:.2f}")
    if "MEM" in only:
        ratios.append(f"mem1000/mem10={got['MEM']['a 1000'].peak_mb / got['MEM']['a 10'].peak_mb:.2f}")
    if quick and {"W2", "S", "MEM"} & set(only):  # their first rounds are not the full run's
        print(f"--quick: its data file has {QUICK_IMAGES:,} images (the full run's {FULL_IMAGES:,}), "
              "which every variant reads, partitions and stores before its first round; only the "
              "full run's first-round figures answer the targets (docs/benchmarks.md)", flush=True)
    cores = os.cpu_count() or 1
    if "C" in only and cores < 3:  # 2 one-CPU nodes, and the driver
        print(f"C: the two 1-CPU nodes and the driver share this machine's {cores} cores, so the "
              "driver's own work (the stores, the server's evaluations) slows the nodes down; "
              "with a core of its own, as on a real cluster, it would not (docs/benchmarks.md)",
              flush=True)
    print(" ".join(ratios), flush=True)
    return 0


if __name__ == "__main__":
    code = child_main()
    gc.freeze()  # every variant's process ends as the `snowfed` command does (cli.console)
    sys.exit(code)
