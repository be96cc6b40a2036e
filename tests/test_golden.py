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
    from snowfed.config import compose
    from snowfed.sim.runner import plain_config, prepare

    _, store = prepare(plain_config(compose(overrides)), run_dir)
    manifest = json.loads(json.dumps(store.manifest, default=str))
    arrays = {name: hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
              for name, array in sorted(store.arrays.items())}
    return {"manifest": manifest, "arrays": arrays}


def run_rounds(overrides: list[str], run_dir: Path) -> dict:
    """What the run's summary says of the rounds and the sites, through Flower's engine."""
    from snowfed.config import compose
    from snowfed.sim.runner import run

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
        return [] if math.isclose(want, got, rel_tol=1e-9, abs_tol=1e-12) else [f"{path}: {want} -> {got}"]
    return [] if want == got else [f"{path}: {want!r} -> {got!r}"]


@pytest.mark.parametrize("setup", sorted(STORE_SETUPS))
def test_a_setup_builds_the_golden_store(setup, tmp_path):
    want = json.loads((GOLDEN / "stores.json").read_text())[setup]
    got = describe_store(STORE_SETUPS[setup], tmp_path / "run")
    assert not (diff := _differences(want, got)), "\n".join(diff[:20])


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
