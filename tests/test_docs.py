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
