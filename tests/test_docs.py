"""The docs site builds in strict mode (a broken link, a missing page or a page outside the nav fails), and
README stays a short entry point whose links all resolve."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MKDOCS = Path(sys.executable).parent / "mkdocs"


def test_the_docs_site_builds_strict(tmp_path):
    if not MKDOCS.exists():
        pytest.skip(f"mkdocs is not installed beside {sys.executable} (pip install -e '.[test]')")
    r = subprocess.run([str(MKDOCS), "build", "--strict", "-f", str(REPO / "mkdocs.yml"), "-d", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "pipeline" / "index.html").is_file() and (tmp_path / "img" / "dvc-plots.png").is_file()


def test_readme_is_short_and_every_link_of_it_resolves():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    links = re.findall(r"\]\(([^)#]+)\)", readme)
    assert links and all((REPO / link).exists() for link in links), [ln for ln in links if not (REPO / ln).exists()]


def _readme_test_command() -> str:
    block = re.search(r"## On a fresh machine\s+```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert len(commands) == 2, f"README's fresh-machine block holds {commands}, not exactly two commands"
    return commands[1]


@pytest.mark.parametrize("script", [".ci/run", ".ci/docker.sh", "docker/base.sh", "docker/build.sh"])
def test_the_ci_and_docker_scripts_parse(script):
    r = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
    assert r.returncode == 0, f"{script} does not parse: {r.stderr}"


def test_ci_ends_by_running_readmes_test_command():
    lines = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[-1] == _readme_test_command()
