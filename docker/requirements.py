"""Print pinned requirements from pyproject.toml, so the image installs its dependencies in a layer of their
own before the source is copied (a code change then reinstalls nothing).

    python3 docker/requirements.py pyproject.toml                       # every dependency of the project
    python3 docker/requirements.py pyproject.toml prefect mlflow        # only these (for the server image)

pyproject.toml stays the one place where versions are pinned.
"""
import re
import sys
import tomllib


def requirements(pyproject: str, only: list[str]) -> list[str]:
    with open(pyproject, "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    if not only:
        return deps
    by_name = {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower(): d for d in deps}
    missing = [n for n in only if n.lower() not in by_name]
    if missing:
        raise SystemExit(f"requirements.py: {', '.join(missing)} not among the dependencies of {pyproject}")
    return [by_name[n.lower()] for n in only]


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print("\n".join(requirements(sys.argv[1], sys.argv[2:])))
