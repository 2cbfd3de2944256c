"""`python -m feddmmr.tracking.plots_page`: the offline page for `dvc plots show`, built only from the pinned releases."""
import io
import tarfile

from feddmmr.tracking import plots_page


def _fake_tarball(folder, package):
    data = b"window.fake = 1;"
    with tarfile.open(folder / plots_page.tarball_name(package), "w:gz") as tar:
        info = tarfile.TarInfo(f"package/{plots_page.PINS[package][1]}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def test_a_tarball_that_is_not_the_published_release_is_refused(tmp_path, capsys):
    for package in plots_page.PINS:
        _fake_tarball(tmp_path, package)
    out = tmp_path / "page.html"
    assert plots_page.main(["--from", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "vega-5.20.2.tgz is not vega 5.20.2 as npm publishes it" in err, err
    assert not out.exists()


def test_without_the_scripts_the_page_loads_them_from_the_cdn_only_when_asked_and_says_so(tmp_path, capsys):
    out = tmp_path / "page.html"
    assert plots_page.main(["--from", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "vega-5.20.2.tgz is missing" in capsys.readouterr().err and not out.exists()
    assert plots_page.main(["--from", str(tmp_path / "none"), "--out", str(out), "--cdn-if-missing"]) == 0
    assert "draws only with internet" in capsys.readouterr().err
    page = out.read_text()
    assert "{scripts}" in page and "{plot_divs}" in page   # DVC's placeholders: its CDN scripts, the plots


def test_the_offline_page_inlines_every_script_and_keeps_dvcs_placeholders():
    page = plots_page.page(["/*vega*/", "/*vega-lite*/", "/*vega-embed*/"], "inlined")
    assert "{scripts}" not in page and "{plot_divs}" in page and "{refresh_tag}" in page
    assert page.count("<script>") == 3 and "src=" not in page
