"""Two `amft register` processes for one run id at the same time ⇒ exactly one model version.

Each process is a real `amft register` (separate interpreter, separate SQLite connection). In the
forced case a tiny wrapper makes both processes pass the "already registered?" lookup before either
creates its version (a file barrier), so the race the registry must resolve really happens every
time; the plain case starts three unmodified `amft` console scripts at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from amft_lib import registry

AMFT = Path(sys.executable).with_name("amft")

# Runs `amft register …` after patching registry._find_by_run_id so that its first call waits until
# every racer has made that call (all of them then see "not registered yet").
_BARRIER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import amft_lib.registry as r
    barrier, n = Path(os.environ["BARRIER_DIR"]), int(os.environ["BARRIER_N"])
    real, state = r._find_by_run_id, {"first": True}
    def find(client, name, run_id):
        found = real(client, name, run_id)
        if state["first"]:
            state["first"] = False
            (barrier / str(os.getpid())).touch()
            deadline = time.time() + 120
            while len(list(barrier.iterdir())) < n and time.time() < deadline:
                time.sleep(0.05)
        return found
    r._find_by_run_id = find
    from amft_lib.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    from amft_lib.config import ModelConfig
    from amft_lib.model import load_policy, save_policy

    root = tmp_path_factory.mktemp("register-race")
    model, tok = load_policy(ModelConfig(name="tiny", tiny_hidden=32, tiny_layers=1, tiny_heads=2), seed=0)
    model_dir = save_policy(model, tok, root / "model")
    eval_dir = root / "eval"
    eval_dir.mkdir()
    (eval_dir / "metrics.json").write_text(json.dumps({
        "test_id": {"accuracy": 0.6, "n": 10}, "blessed": True, "reason": "blessed: test",
    }))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    registry.get_client(uri).search_registered_models()  # create the schema once, before the race
    return {"root": root, "model": str(model_dir), "eval": str(eval_dir), "uri": uri}


def _race(setup: dict, name: str, n: int, barrier: bool) -> list[subprocess.CompletedProcess]:
    args = ["register", "--model", setup["model"], "--eval", setup["eval"], "--name", name,
            "--run-id", "run-race-1", "--tracking-uri", setup["uri"],
            "--artifact-root", str(setup["root"] / "artifacts")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AMFT_STATE_DIR": str(setup["root"] / "state")}
    if barrier:
        bdir = setup["root"] / f"barrier-{name}"
        bdir.mkdir()
        env.update(BARRIER_DIR=str(bdir), BARRIER_N=str(n))
        cmd = [sys.executable, "-c", _BARRIER, *args]
    else:
        cmd = [str(AMFT), *args]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def _versions(setup: dict, name: str) -> list:
    return registry.get_client(setup["uri"]).search_model_versions(f"name = '{name}'")


@pytest.mark.parametrize(("n", "barrier"), [(2, True), (3, False)], ids=["forced-race-2", "plain-3"])
def test_concurrent_register_creates_one_version(setup: dict, n: int, barrier: bool) -> None:
    name = f"amft-race-{n}-{int(barrier)}"
    results = _race(setup, name, n, barrier)
    for r in results:
        assert r.returncode == 0, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
    versions = _versions(setup, name)
    assert len(versions) == 1, [(v.version, v.tags.get(registry.RUN_ID_TAG)) for v in versions]
    created = [r for r in results if "(created" in r.stdout]
    assert len(created) == 1, [r.stdout for r in results]
    # every process reports the same surviving version; the alias points at it
    winner = versions[0].version
    assert all(f"version {winner} " in r.stdout for r in results), [r.stdout for r in results]
    champion = registry.get_client(setup["uri"]).get_model_version_by_alias(name, "champion")
    assert champion.version == winner
    if barrier:  # the race really happened: every loser created a version, then deleted it
        from mlflow.entities import ViewType

        client = registry.get_client(setup["uri"])
        exp = client.get_experiment_by_name("amft")
        losers = client.search_runs([exp.experiment_id], "tags.`amft.duplicate_of` != ''",
                                    run_view_type=ViewType.ALL)
        assert len(losers) == n - 1
        assert str(winner) == "1"  # the lowest version wins
    # a sequential retry stays idempotent
    again = _race(setup, name, 1, False)[0]
    assert again.returncode == 0 and "(existing" in again.stdout
    assert len(_versions(setup, name)) == 1
