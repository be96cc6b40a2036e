"""Golden federations: the store that a few setups build (manifest and a digest of every array)
and the rounds of one short run, compared with what the code gave when the file was written.
A refactor must leave them as they are; a change meant to alter the data or the training
rewrites them, on purpose and in the same commit:

    .venv/bin/python tests/test_golden.py    # rewrites tests/golden/*.json
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).parent / "golden"
# synthetic (plain, and with the server's clean rows), loaded classification (partition,
# shortcut, fused annotators)
STORE_SETUPS = {
    "smoke-seed5": ["federation=smoke", "seed=5"],
    "one_big_noisy-quality-seed2": ["federation=one_big_noisy", "aggregation=quality", "seed=2"],
    "digits_pitfalls-seed1": ["task=classification", "federation=digits_pitfalls", "seed=1"],
}
RUN_SETUP = ["federation=smoke", "rounds=2", "seed=4", "strategy.local_steps=5"]


def describe_store(overrides: list[str], run_dir: Path) -> dict:
    from snowfed.config import compose, plain_config
    from snowfed.sim.run.plan import prepare

    _, store = prepare(plain_config(compose(overrides)), run_dir)
    manifest = json.loads(json.dumps(store.manifest, default=str))
    arrays = {name: {"sha256": hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest(),
                     "row_means": [round(float(m), 6) for m in
                                   array.reshape(len(array), -1).astype(np.float64).mean(axis=1)]}
              for name, array in sorted(store.arrays.items())}
    return {"manifest": manifest, "arrays": arrays}


# Another CPU rounds some floats otherwise (its vector units): a synthetic image's uint8 pixels
# then differ by one here and there, and two rounds of training by about 1e-4 in F1 (measured
# between two Xeon machines). A refactor that changes the data or the training moves an
# image's mean by far more than ARRAY_TOL of its range, and a round's metrics by more than
# METRIC_TOL; an array whose digest matches is equal.
ARRAY_TOL = 1e-3  # of the array's largest value, on each row's mean
METRIC_TOL = 2e-3  # relative and absolute, on every float of the rounds


def _array_differences(name: str, want: dict, got: dict) -> list[str]:
    if want["sha256"] == got["sha256"]:
        return []
    tol = ARRAY_TOL * max(1.0, max(map(abs, want["row_means"]), default=1.0))
    if len(want["row_means"]) != len(got["row_means"]):
        return [f"{name}: {len(want['row_means'])} rows -> {len(got['row_means'])}"]
    rows = enumerate(zip(want["row_means"], got["row_means"]))
    return [f"{name}[{i}] mean: {w} -> {g}" for i, (w, g) in rows if abs(w - g) > tol]


def run_rounds(overrides: list[str], run_dir: Path) -> dict:
    """What the run's summary says of the rounds and the sites, through Flower's engine."""
    from snowfed.config import compose
    from snowfed.sim.run.runner import run

    summary = run(compose(overrides), run_dir, quiet=True)
    return {"history": summary["history"], "diagnostics": summary["diagnostics"],
            "final_train": {name: node["final_train"] for name, node in summary["nodes"].items()}}


def _differences(want, got, path="") -> list[str]:
    if isinstance(want, dict) and isinstance(got, dict):
        return [d for k in sorted(want.keys() | got.keys())
                for d in (_differences(want.get(k), got.get(k), f"{path}.{k}")
                          if k in want and k in got else [f"{path}.{k}: only one side has it"])]
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        return [d for i, (w, g) in enumerate(zip(want, got)) for d in _differences(w, g, f"{path}[{i}]")]
    if isinstance(want, float) and isinstance(got, float):
        close = math.isclose(want, got, rel_tol=METRIC_TOL, abs_tol=METRIC_TOL)
        return [] if close else [f"{path}: {want} -> {got}"]
    return [] if want == got else [f"{path}: {want!r} -> {got!r}"]


@pytest.mark.parametrize("setup", sorted(STORE_SETUPS))
def test_a_setup_builds_the_golden_store(setup, tmp_path):
    want = json.loads((GOLDEN / "stores.json").read_text())[setup]
    got = describe_store(STORE_SETUPS[setup], tmp_path / "run")
    diff = _differences(want["manifest"], got["manifest"], ".manifest") + [
        d for name in sorted(want["arrays"].keys() | got["arrays"].keys())
        for d in (_array_differences(name, want["arrays"][name], got["arrays"][name])
                  if name in want["arrays"] and name in got["arrays"] else [f"{name}: only one side has it"])]
    assert not diff, "\n".join(diff[:20])


@pytest.mark.slow
def test_a_short_run_gives_the_golden_rounds(tmp_path):
    want = json.loads((GOLDEN / "rounds.json").read_text())
    got = run_rounds(RUN_SETUP, tmp_path / "run")
    assert len(want["history"]) == 3 and not (diff := _differences(want, got)), "\n".join(diff[:20])


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        stores = {name: describe_store(o, Path(tmp) / name) for name, o in STORE_SETUPS.items()}
        rounds = run_rounds(RUN_SETUP, Path(tmp) / "rounds")
    GOLDEN.mkdir(exist_ok=True)
    (GOLDEN / "stores.json").write_text(json.dumps(stores, indent=1, sort_keys=True) + "\n")
    (GOLDEN / "rounds.json").write_text(json.dumps(rounds, indent=1) + "\n")
    print(f"wrote {GOLDEN}/stores.json and rounds.json", file=sys.stderr)
