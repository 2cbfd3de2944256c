"""feddmmr sweep: one DVC experiment and MLflow pipeline run per seed, summarised with intervals and paired
tests, on a scratch git + DVC project."""
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from conftest import git_dvc_project
from feddmmr.evaluation.stats import seed_interval

BIN = Path(sys.executable).parent


def sh(*cmd, cwd):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A scratch project after `dvc repro`, its dvc.lock committed: what ablations start from, and a project
    whose seed 42 (params.yaml's) DVC has seen before."""
    project = git_dvc_project(tmp_path_factory.mktemp("sweeps") / "project")
    sh("dvc", "repro", cwd=project)
    sh("git", "add", "-A", cwd=project)
    sh("git", "-c", "user.email=t@localhost", "-c", "user.name=t", "commit", "-qm", "dvc repro", cwd=project)
    return project


@pytest.mark.slow
def test_a_seed_sweep_is_one_experiment_per_seed_summarised_over_seeds(project):
    out = sh(BIN / "feddmmr", "sweep", "--seeds", "42", "1", cwd=project)
    assert "seed 42: running experiment seeds-42-" in out and "seed 1: running experiment seeds-1-" in out
    # seed 42's stages match dvc.lock: DVC would restore them, recorded under `dvc repro`'s pipeline run; the
    # training stages alone are retrained (dvc.lock is tracked, dvc status clean)
    assert ("seed 42: DVC restored stages trained before under another pipeline run; training pretrain_sasrec "
            "align_projectors finetune_moe centralized again") in out and "seed 1: DVC restored" not in out
    names = [line.split("experiment ")[1].split(" ")[0] for line in out.splitlines() if ": running experiment" in line]

    # DVC: an experiment per seed, every training stage's seed set, the user's checkout untouched
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=project))
    exps = {e["name"]: e for row in shown for e in (row.get("experiments") or []) for e in e["revs"]}
    for seed, name in zip((42, 1), names):
        params = exps[name]["data"]["params"]["params.yaml"]["data"]
        assert [params[s]["seed"] for s in ("pretrain_sasrec", "align_projectors", "finetune_moe", "centralized")] \
            == [seed] * 4
    assert sh("git", "status", "--porcelain", cwd=project) == ""

    # MLflow: a pipeline run per seed; the table's mean and interval are those of the two runs
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlruns.db'}")
    exp = client.get_experiment_by_name("feddmmr")
    values, finals = [], {}
    for name in names:
        parent, = client.search_runs([exp.experiment_id], filter_string=f"tags.`feddmmr.pipeline_key` = '{name}' "
                                     "and tags.`feddmmr.kind` = 'pipeline'")
        stages = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        final = {r.data.tags["feddmmr.stage"]: r for r in stages}
        assert {"pretrain_sasrec", "align_projectors", "finetune_moe", "centralized"} <= set(final)
        values.append(final["finetune_moe"].data.metrics["test.full.NDCG_at_10"])
        finals[name] = final
    mean, half = seed_interval(values)
    ndcg = next(line for line in out.splitlines() if line.startswith("NDCG@10")).split()
    assert ndcg[7:10] == [f"{mean:.4f}", "±", f"{half:.4f}"]          # the finetune_moe column
    # 4 columns against the first: popularity, restored from dvc.lock in both seeds, is `dvc repro`'s run
    header = next(line for line in out.splitlines() if line.startswith("metric")).split()
    assert header[-1] == "popularity" and sum(line.startswith("  seed ") and " p = " in line
                                              for line in out.splitlines()) == 2 * 4
    # each training stage's validation path per seed (stage 2's first round: what it did to its start), and
    # the price of federation, both from the stages' own MLflow records
    m = finals[names[1]]["align_projectors"].data.metrics
    assert (f"  seed 1 align_projectors: start {m['selection.start']:.4f}, first round "
            f"{m['selection.first_round_change']:+.4f}, best round {int(m['best_round'])}, "
            f"best {m['selection.best_gain']:+.4f}") in out.splitlines()
    assert sum(line.startswith("  seed ") and "first round" in line for line in out.splitlines()) == 2 * 3
    f, c = (finals[names[0]][s].data.metrics["test.full.NDCG_at_10"] for s in ("pretrain_sasrec", "centralized"))
    assert f"federated / centralized test full NDCG@10 (pretrain_sasrec / centralized): seed 42 {f / c:.3f}" in out

    # the same sweep again runs nothing
    again = sh(BIN / "feddmmr", "sweep", "--seeds", "42", "1", cwd=project)
    assert again.count("already finished") == 2 and "running" not in again


@pytest.mark.slow
def test_ablate_retrains_stage3_once_per_ablation_and_tests_each_against_the_full_model(project):
    from feddmmr.evaluation.stats import paired_test
    from feddmmr.experiments.sweeps import ABLATIONS
    from feddmmr.tracking.reports import test_ranks
    chosen = ["backbone-only", "text-only", "no-contrastive-loss"]            # and full, the reference
    out = sh(BIN / "feddmmr", "ablate", *chosen, cwd=project)
    names = {line.split(":")[0]: line.split("experiment ")[1].split(" ")[0]
             for line in out.splitlines() if ": running experiment" in line}
    assert list(names) == [a for a in ABLATIONS if a in chosen + ["full"]]

    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=project))
    exps = {e["name"]: e for row in shown for e in (row.get("experiments") or []) for e in e["revs"]}
    stage3 = exps[names["text-only"]]["data"]["params"]["params.yaml"]["data"]["finetune_moe"]
    assert stage3["modalities"] == ["text"] and stage3["long_term"] is True
    assert exps[names["no-contrastive-loss"]]["data"]["params"]["params.yaml"]["data"]["finetune_moe"][
        "contrastive_weight"] == 0.0

    uri = f"sqlite:///{project / 'mlruns.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("feddmmr")
    run = {}
    for a, name in names.items():   # every ablation retrained stage 3 under its own pipeline run
        parent, = client.search_runs([exp.experiment_id], filter_string=f"tags.`feddmmr.pipeline_key` = '{name}' "
                                     "and tags.`feddmmr.kind` = 'pipeline'")
        run[a], = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = "
                                     f"'{parent.info.run_id}' and tags.`feddmmr.stage` = 'finetune_moe'")
    assert run["backbone-only"].data.metrics["gating_weight"] == 0.0
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in ABLATIONS}
    assert set(rows) == set(names)
    full = test_ranks(uri, run["full"].info.run_id, "full")
    test = paired_test(full, test_ranks(uri, run["no-contrastive-loss"].info.run_id, "full"), "NDCG@10")
    assert f"{test.diff:+.4f} [{test.low:+.4f}, {test.high:+.4f}]" in rows["no-contrastive-loss"]
    assert f"{run['text-only'].data.metrics['test.full.NDCG_at_10']:.4f}" in rows["text-only"]

    again = sh(BIN / "feddmmr", "ablate", *chosen, cwd=project)
    assert again.count("already finished") == len(names) and "running" not in again


@pytest.mark.parametrize("command, message", [
    (["sweep", "--seeds", "1", "2", "-S", "tracking.enabled=false"], "tracking.enabled is false: set it to true"),
    (["ablate", "-S", "tracking.enabled=false"], "tracking.enabled is false: set it to true"),
    (["ablate", "text-only", "no-memory"], "unknown ablation no-memory: choose from full, backbone-only"),
])
def test_experiments_that_cannot_run_are_refused_before_running_any(tmp_path, command, message):
    r = subprocess.run([str(BIN / "feddmmr"), *command], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr and not any(tmp_path.iterdir())


def test_a_restored_seed_retrains_the_whole_pipeline_unless_dvc_lock_is_tracked_and_current(tmp_path):
    from feddmmr.experiments.sweeps import _seeded_stages_alone
    from feddmmr.experiments.sweeps import SEEDED
    project = git_dvc_project(tmp_path / "project")            # no dvc.lock yet: DVC restored from its run-cache
    assert _seeded_stages_alone(project) == []
    sh(BIN / "dvc", "repro", cwd=project)
    assert _seeded_stages_alone(project) == []                 # dvc.lock current, but git does not track it
    sh("git", "add", "dvc.lock", cwd=project)
    sh("git", "-c", "user.email=t@localhost", "-c", "user.name=t", "commit", "-qm", "lock", cwd=project)
    assert _seeded_stages_alone(project) == list(SEEDED)       # tracked and current: the seeded stages alone
    params = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(params.replace("rounds: 2", "rounds: 1", 1))
    assert _seeded_stages_alone(project) == []                 # a stage differs from dvc.lock: the whole pipeline
