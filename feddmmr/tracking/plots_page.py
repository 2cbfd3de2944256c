"""The page `dvc plots show` writes, with vega, vega-lite and vega-embed inlined, so that it draws offline.

DVC's own page loads these three scripts from a CDN: on a machine without internet (a cluster node, an
air-gapped lab) it stays white. `make install` runs ``python -m feddmmr.tracking.plots_page``, which fetches the releases
DVC's renderer is written for with ``npm pack`` (or takes the tarballs from ``--from DIR``), checks each against
its npm integrity hash, and writes ``.dvc/plots/page.html``; ``.dvc/config`` names that page as the plots
template (``plots.html_template``). Where neither npm nor the tarballs are at hand, it writes a page that loads
the scripts from the CDN and says so: the plots then need internet, as DVC's own page does.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from feddmmr.errors import FeddmmrError
from feddmmr.io import atomic_path

# the releases dvc-render's VegaRenderer loads (its SCRIPTS), with their npm integrity hashes
PINS = {
    "vega": ("5.20.2", "build/vega.min.js",
             "sha512-qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw=="),
    "vega-lite": ("5.2.0", "build/vega-lite.min.js",
                  "sha512-Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw=="),
    "vega-embed": ("6.18.2", "build/vega-embed.min.js",
                   "sha512-wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg=="),
}
DEFAULT_OUT = Path(".dvc") / "plots" / "page.html"
STYLE = "body { font-family: sans-serif; } div.vega-embed { margin: 8px; }"
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>feddmmr: DVC plots</title>
    <!-- {origin} -->
    SCRIPTS
    <style>STYLE</style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def tarball_name(package: str) -> str:
    return f"{package}-{PINS[package][0]}.tgz"


def fetch(folder: Path) -> None:
    """``npm pack`` the pinned releases into ``folder`` (npm's own cache and registry settings apply)."""
    npm = shutil.which("npm")
    if npm is None:
        raise FeddmmrError("npm is not installed: install Node.js and npm, or pass --from a folder holding "
                           + ", ".join(tarball_name(p) for p in PINS))
    specs = [f"{p}@{version}" for p, (version, _, _) in PINS.items()]
    r = subprocess.run([npm, "pack", "--silent", *specs], cwd=folder, capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FeddmmrError(f"npm pack {' '.join(specs)} failed: {last[0]}; check npm's registry setting "
                           f"(`npm config get registry`) or pass --from a folder holding the tarballs")


def script(folder: Path, package: str) -> str:
    """The package's minified build from its tarball in ``folder``, checked against its integrity hash."""
    version, member, integrity = PINS[package]
    path = folder / tarball_name(package)
    if not path.is_file():
        raise FeddmmrError(f"{path} is missing: fetch it with `npm pack {package}@{version}`")
    algo, _, want = integrity.partition("-")
    got = base64.b64encode(hashlib.new(algo, path.read_bytes()).digest()).decode()
    if got != want:
        raise FeddmmrError(f"{path} is not {package} {version} as npm publishes it ({algo} differs); "
                           f"delete it and fetch it again")
    with tarfile.open(path) as tar:
        text = tar.extractfile(f"package/{member}").read().decode("utf-8")
    if "</script" in text.lower():   # would end the inline <script> element early
        raise FeddmmrError(f"{path}: {member} holds '</script', which cannot be inlined in a page")
    return text


def page(scripts: list[str] | None, origin: str) -> str:
    """The template: inlined scripts, or DVC's CDN scripts (its ``{scripts}`` placeholder) when ``None``."""
    tags = "{scripts}" if scripts is None else "\n".join(f"<script>{s}</script>" for s in scripts)
    return PAGE.replace("{origin}", origin).replace("STYLE", STYLE).replace("SCRIPTS", tags)


def build(out: Path, source: Path | None) -> str:
    """Write the page to ``out`` (atomically); what it holds, in one line."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = source if source is not None else Path(tmp)
        if source is None:
            fetch(folder)
        scripts = [script(folder, p) for p in PINS]
    origin = "inlined: " + ", ".join(f"{p} {v}" for p, (v, _, _) in PINS.items())
    write(out, page(scripts, origin))
    return origin


def write(out: Path, text: str) -> None:
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m feddmmr.tracking.plots_page", description=__doc__.split("\n\n")[0],
                                 epilog="`dvc plots show` then writes dvc_plots/index.html, which draws offline.")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the page to write (default {DEFAULT_OUT})")
    ap.add_argument("--from", dest="source", type=Path, default=None,
                    help="a folder holding " + ", ".join(tarball_name(p) for p in PINS) + " (default: npm pack)")
    ap.add_argument("--cdn-if-missing", action="store_true",
                    help="where the scripts cannot be had, write a page that loads them from the CDN (needs "
                         "internet to draw) and warn, instead of failing")
    args = ap.parse_args(argv)
    try:
        origin = build(args.out, args.source)
    except FeddmmrError as exc:
        if not args.cdn_if_missing:
            print(f"feddmmr: error: {exc}", file=sys.stderr)
            return 2
        write(args.out, page(None, "loaded from cdn.jsdelivr.net: needs internet"))
        print(f"warning: {exc}. {args.out} loads vega from the CDN, so `dvc plots show` draws only with internet; "
              f"run `python -m feddmmr.tracking.plots_page` again to draw offline", file=sys.stderr)
        return 0
    print(f"{args.out}: `dvc plots show` draws offline ({origin})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
