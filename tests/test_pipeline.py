"""`dvc repro` on the project's own dvc.yaml and params.yaml, in a scratch copy, with tiny settings."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, add_dvc_pipeline, write_tiny_project
from feddmmr.modalities import NAMES

BIN = Path(sys.executable).parent


def dvc(*args, cwd, **env_extra):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", **env_extra}
    return subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, capture_output=True, text=True, env=env)


# imported by every Python process started with this folder on PYTHONPATH: at exit, it writes the process's
# command line and the feddmmr modules it loaded (the code it ran) to $FEDDMMR_MODULES_LOG/<pid>.txt
MODULE_LOG_HOOK = """import atexit, os, sys
def _write():
    with open(os.path.join(os.environ["FEDDMMR_MODULES_LOG"], f"{os.getpid()}.txt"), "w") as f:
        f.write("\\n".join([" ".join(sys.argv)] + sorted(m for m in sys.modules if m.split(".")[0] == "feddmmr")))
if os.environ.get("FEDDMMR_MODULES_LOG"):
    atexit.register(_write)
"""


MODULES_LOGS: dict[Path, Path] = {}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    if not (BIN / "dvc").exists():
        pytest.skip(f"dvc is not installed beside {sys.executable}")
    root = add_dvc_pipeline(write_tiny_project(tmp_path_factory.mktemp("project"), top_k_users=60, eval_negatives=50))
    r = dvc("init", "--no-scm", "-q", cwd=root)
    assert r.returncode == 0, r.stderr
    hook, log = tmp_path_factory.mktemp("hook"), tmp_path_factory.mktemp("modules")
    (hook / "sitecustomize.py").write_text(MODULE_LOG_HOOK)
    path = os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])
    r = dvc("repro", cwd=root, PYTHONPATH=path, FEDDMMR_MODULES_LOG=str(log))
    assert r.returncode == 0, r.stdout + r.stderr
    MODULES_LOGS[root] = log   # what each stage's command loaded (test_each_stage_depends_on_the_code_it_runs)
    return root


def test_dvc_repro_runs_every_stage_and_writes_metrics(project):
    for stage in ("pretrain_sasrec", "align_projectors", "finetune_moe"):
        m = json.loads((project / "metrics" / f"{stage}.json").read_text())
        assert m["rounds_run"] == 2 and 0 < m["test"]["sampled"]["HR@20"] <= 1, stage
        assert (project / "checkpoints" / stage / "model.safetensors").is_file()
    for stage in ("align_projectors", "finetune_moe"):
        assert (project / "checkpoints" / stage / "memory.safetensors").is_file()
        report = json.loads((project / "checkpoints" / stage / "load_report.json").read_text())
        assert {"item_embeddings", "backbone"} <= set(report["loaded"])
    meta = json.loads((project / "data" / "prepared" / "meta.json").read_text())
    assert meta["num_users"] == 60
    r = dvc("metrics", "show", "--json", cwd=project)
    assert r.returncode == 0 and "finetune_moe" in r.stdout


def test_bytecode_caches_leave_every_stage_up_to_date(project):
    """Running the library writes feddmmr/__pycache__ (where PYTHONDONTWRITEBYTECODE is unset, as on most
    machines): that must not change the code hash of any stage, or every stage would rerun after any command
    and a flow run's clone (no caches) would never match DVC's run-cache."""
    import compileall
    assert compileall.compile_dir(project / "feddmmr", quiet=1, force=True)
    assert list((project / "feddmmr").rglob("*.pyc"))
    status = dvc("status", cwd=project)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout


RECORDS = ("feddmmr/tracking/", "feddmmr/serving/")   # write to MLflow, never to a stage's outputs
ENGINE_APPS = "feddmmr/flower/"    # run by the training stages when federation.engine is flower (here: simulator)


def _stage_of(argv: list[str]) -> str | None:
    """The dvc.yaml stage a `feddmmr` command line runs."""
    if not argv[0].endswith("feddmmr"):
        return None
    args = [a for a in argv[1:] if a != "-q"]
    if args[0] == "features":
        return f"features_{args[1]}"
    return args[args.index("--stage") + 1] if args[0] == "train" else args[1] if args[0] == "baseline" else args[0]


def _loaded_files(log: Path) -> dict[str, set[str]]:
    """{stage: the package files of the modules its command loaded}, from the module log of `dvc repro`."""
    loaded: dict[str, set[str]] = {}
    for f in log.glob("*.txt"):
        argv, *modules = f.read_text().splitlines()
        stage = _stage_of(argv.split())
        for m in modules if stage else ():
            path = m.replace(".", "/")
            loaded.setdefault(stage, set()).add(f"{path}/__init__.py" if (REPO / path).is_dir() else f"{path}.py")
    return loaded


def _code_deps(stage: dict) -> set[str]:
    files = set()
    for dep in stage["deps"]:
        if dep.split("/")[0] == "feddmmr":
            target = REPO / dep
            files |= ({p.relative_to(REPO).as_posix() for p in target.rglob("*.py")} if target.is_dir() else {dep})
    return files


def test_each_stage_depends_on_the_code_it_runs_and_nothing_else(project):
    """dvc.yaml's code dependencies of a stage are the package files whose modules its command loads (the records,
    which write to MLflow only, aside): a module it runs that DVC does not watch would leave stale outputs after
    an edit, a file it never runs would retrain it for nothing."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    loaded = _loaded_files(MODULES_LOGS[project])
    assert set(loaded) == set(stages), set(stages) ^ set(loaded)
    for name, stage in stages.items():
        deps, ran = _code_deps(stage), {f for f in loaded[name] if not f.startswith(RECORDS)}
        assert not ran - deps, f"{name} runs {sorted(ran - deps)}, which dvc.yaml does not list"
        unused = {f for f in deps - ran if not (f.startswith(ENGINE_APPS) and "federation.engine" in stage["params"])}
        assert not unused, f"{name} depends on {sorted(unused)}, which it does not run"


def _touch(project: Path, relative: str) -> str:
    """Change a package file of the scratch project the way an edit would; returns the old text."""
    path = project / relative
    old = path.read_text()
    path.write_text(old + "\n# an edit\n")
    return old


@pytest.mark.parametrize("edited, stale", [
    ("feddmmr/serving/recommend.py", set()),
    ("feddmmr/serving/pyfunc.py", set()),
    ("feddmmr/experiments/sweeps.py", set()),
    ("feddmmr/tracking/run.py", set()),
    ("feddmmr/model/sasrec.py", {"pretrain_sasrec", "align_projectors", "finetune_moe", "centralized"}),
    ("feddmmr/features/text.py", {"features_text"}),
    ("feddmmr/features/store.py", {*(f"features_{m}" for m in NAMES), "pretrain_sasrec", "align_projectors",
                                   "finetune_moe", "centralized"}),
])
def test_an_edit_reruns_exactly_the_stages_whose_code_it_changes(project, edited, stale):
    old = _touch(project, edited)
    try:
        status = dvc("status", "--json", cwd=project)
        assert status.returncode == 0, status.stderr
        assert set(json.loads(status.stdout)) == stale
    finally:
        (project / edited).write_text(old)
    assert "up to date" in dvc("status", cwd=project).stdout


def test_dvc_repro_rebuilds_only_what_changed(project):
    assert "up to date" in dvc("status", cwd=project).stdout
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["pretrain_sasrec"]["rounds"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = dvc("status", "--json", cwd=project)
    assert set(json.loads(status.stdout)) == {"pretrain_sasrec"}
    r = dvc("repro", cwd=project)
    assert r.returncode == 0, r.stderr
    assert "Stage 'prepare' didn't change, skipping" in r.stdout
    assert json.loads((project / "metrics" / "pretrain_sasrec.json").read_text())["rounds_run"] == 1
    # the later stages depend on the retrained checkpoint, so they re-ran on it
    report = json.loads((project / "checkpoints" / "align_projectors" / "load_report.json").read_text())
    assert report["source_stage"] == "pretrain_sasrec"


def test_two_stage_path_from_params(project):
    """finetune_moe.init_from: pretrain_sasrec makes stage 3 depend on stage 1 directly."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["finetune_moe"]["init_from"] = "pretrain_sasrec"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r = dvc("repro", "finetune_moe", cwd=project)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "align_projectors" not in r.stdout
    report = json.loads((project / "checkpoints" / "finetune_moe" / "load_report.json").read_text())
    assert report["source_stage"] == "pretrain_sasrec" and set(report["loaded"]) == {"item_embeddings", "backbone"}


def _set_params(project, **stage_values):
    params = yaml.safe_load((project / "params.yaml").read_text())
    for dotted, value in stage_values.items():
        section, key = dotted.split("__")
        params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_failed_rerun_is_restored_by_dvc_checkout(project):
    """DVC deletes a stage's outputs before running it; after a failed rerun, one command brings back the last
    successful checkpoint and its metrics (both are cached outputs)."""
    before = {p: (project / p).read_bytes() for p in ("metrics/pretrain_sasrec.json",
                                                       "checkpoints/pretrain_sasrec/model.safetensors")}
    saved = (project / "params.yaml").read_text()
    _set_params(project, pretrain_sasrec__lr=-1.0)
    r = dvc("repro", "pretrain_sasrec", cwd=project)
    assert r.returncode != 0 and "pretrain_sasrec.lr must be > 0" in r.stderr
    r = dvc("checkout", "pretrain_sasrec", cwd=project)
    assert r.returncode == 0, r.stderr
    assert {p: (project / p).read_bytes() for p in before} == before
    (project / "params.yaml").write_text(saved)


def test_stage_killed_under_dvc_repro_resumes_bit_identical(project, tmp_path):
    import signal
    import time
    _set_params(project, pretrain_sasrec__rounds=12, pretrain_sasrec__patience=100)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([str(BIN / "dvc"), "repro", "pretrain_sasrec"], cwd=project, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    seen = ""
    deadline = time.time() + 300
    while "pretrain_sasrec round 4:" not in seen and time.time() < deadline and proc.poll() is None:
        seen += proc.stdout.readline()
    assert "pretrain_sasrec round 4:" in seen, seen
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (project / "checkpoints" / ".pretrain_sasrec.resume" / "state.json").is_file()
    r = dvc("repro", "pretrain_sasrec", cwd=project)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming after round" in r.stdout + r.stderr
    assert not (project / "checkpoints" / ".pretrain_sasrec.resume").exists()
    ref = subprocess.run([str(BIN / "feddmmr"), "-q", "train", "--out", str(tmp_path / "ref"), "--metrics",
                          str(tmp_path / "ref.json"), "-S", "tracking.enabled=false"], cwd=project, env=env,
                         capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    ck = project / "checkpoints" / "pretrain_sasrec" / "model.safetensors"
    assert ck.read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()
    assert json.loads((project / "metrics" / "pretrain_sasrec.json").read_text())["test"] == \
        json.loads((tmp_path / "ref.json").read_text())["test"]


def test_every_line_of_readmes_quick_start_runs_on_the_reproduced_demo(project):
    """README's quick-start block, line by line, in a project `dvc repro` trained on the demo data (the README's
    recommend example used ML-1M ids and failed there)."""
    import re
    blocks = {}
    for page in ("README.md", "docs/getting-started.md"):   # the same block in both, so both run
        found = re.search(r"<!-- quick-start -->\n```bash\n(.*?)```", (REPO / page).read_text(), re.S)
        assert found, f"{page} has no <!-- quick-start --> block"
        blocks[page] = found
    block = blocks["README.md"]
    assert blocks["docs/getting-started.md"].group(1) == block.group(1)
    lines = [line.split("  #")[0].strip() for line in block.group(1).splitlines()]
    commands = [line for line in lines if line and not line.startswith("source ")]
    assert len(commands) >= 4
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    for command in commands:
        r = subprocess.run(["bash", "-c", command], cwd=project, capture_output=True, text=True, env=env)
        assert r.returncode == 0, f"{command}: {r.stderr[-500:]}"
        assert r.stdout.strip(), command


def test_dvc_lists_a_few_metrics_per_stage_and_keeps_every_one_at_hand(project):
    """`dvc exp show` had 293 columns (every metric of every stage); it lists the summaries now."""
    def leaves(x):
        return sum(leaves(v) for v in x.values()) if isinstance(x, dict) else 1
    r = dvc("metrics", "show", "--json", cwd=project)
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    files = next(iter(shown.values()))["data"]
    stages = ("pretrain_sasrec", "align_projectors", "finetune_moe", "popularity", "centralized")
    assert sorted(files) == sorted(f"metrics/{s}.summary.json" for s in stages)
    assert all(leaves(f["data"]) <= 6 for f in files.values())
    summary = files["metrics/finetune_moe.summary.json"]["data"]
    full = json.loads((project / "metrics" / "finetune_moe.json").read_text())
    assert summary["test"]["full"]["NDCG@10"] == full["test"]["full"]["NDCG@10"]
    assert summary["best_round"] == full["best_round"]
    r = dvc("metrics", "show", "--json", "metrics/finetune_moe.json", cwd=project)   # every metric, on request
    assert r.returncode == 0 and "MRR" in r.stdout, r.stderr


# Counts what each panel's colour scale holds, once vega-embed has drawn it (an observer of the page's own
# vegaEmbed calls, added after the page's scripts; the page and its scripts are used as `dvc plots show` wrote them).
_OBSERVER = """<script>
const drawn = [];
const embed = window.vegaEmbed;
window.vegaEmbed = (el, spec, opts) => embed(el, spec, opts).then(r => {
  const colour = r.view.scale('color');
  drawn.push({title: spec.title.text, series: colour.domain().length, colours: new Set(colour.domain().map(d => colour(d))).size});
  document.getElementById('observed').textContent = JSON.stringify(drawn);
  return r;
}, e => { document.getElementById('observed').textContent = 'error: ' + e; });
</script>"""


def _chromium() -> str:
    import shutil
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
    return exe


def test_dvc_plots_page_draws_offline_with_a_colour_per_series(project, tmp_path):
    """`dvc plots show` with the project's template and page, opened in headless Chromium with every host name
    unresolvable: all four panels draw, each series in its own colour."""
    import re
    import shutil
    page = REPO / ".dvc" / "plots" / "page.html"
    if not page.is_file():
        pytest.skip(f"{page} is missing: `make install` writes it (python -m feddmmr.tracking.plots_page)")
    shutil.copytree(REPO / ".dvc" / "plots", project / ".dvc" / "plots", dirs_exist_ok=True)
    assert dvc("config", "plots.html_template", "plots/page.html", cwd=project).returncode == 0
    r = dvc("plots", "show", "-o", str(tmp_path / "plots"), cwd=project)
    assert r.returncode == 0, r.stdout + r.stderr
    html = (tmp_path / "plots" / "index.html").read_text()
    assert not re.search(r"<script[^>]+src=", html), "the page loads a script from elsewhere"
    head, _, body = html.rpartition("</head>")   # the last one: vega-embed's script holds page text too
    html = head + _OBSERVER + "</head>" + body.replace("<body>", "<body><pre id='observed'></pre>", 1)
    (tmp_path / "plots" / "observed.html").write_text(html)
    dom = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
         "--disable-background-networking", "--disable-component-update", f"--user-data-dir={tmp_path / 'profile'}",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=10000", "--dump-dom",
         (tmp_path / "plots" / "observed.html").as_uri()], capture_output=True, text=True, timeout=120).stdout
    observed = re.search(r"<pre id=\"observed\">(.*?)</pre>", dom, re.S)
    assert observed and observed.group(1).startswith("["), (observed.group(1) if observed else dom[-2000:])
    panels = {p["title"]: p for p in json.loads(observed.group(1).replace("&quot;", '"'))}
    assert {t: p["series"] for t, p in panels.items()} == {
        "validation NDCG@10": 6, "validation HR@10": 6, "train loss": 3, "gate and router weights": 6}
    assert all(p["colours"] == p["series"] for p in panels.values()), panels


def test_every_column_dvc_yaml_plots_is_one_that_rounds_csv_has(project):
    """Renaming a column of rounds.csv broke `dvc plots` silently: each panel's x and y must be columns of the
    file the stage writes."""
    import csv
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    assert plots
    for panel in plots:
        (title, spec), = panel.items()
        for path, columns in spec["y"].items():
            with open(project / path, newline="") as f:
                header = next(csv.reader(f))
            wanted = [spec["x"], *([columns] if isinstance(columns, str) else columns)]
            assert set(wanted) <= set(header), f"{title}: {path} has no {sorted(set(wanted) - set(header))}"
