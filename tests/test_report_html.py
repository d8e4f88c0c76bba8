"""report.html: one self-contained page a release engineer looks at, rendered in a real headless
browser: it loads without errors or any network request, and its plots are there."""

import re
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.slow
PLOTS = ("plot-agreement", "plot-differences", "plot-margins", "plot-lengths", "plot-sizes")


def test_the_release_s_html_report_is_self_contained_and_has_its_plots(tiny_release):
    page = tiny_release.out / "report.html"
    html = page.read_text()
    manifest = tiny_release.manifest.model_dump()
    assert manifest["files"]["report.html"]["role"] == "report"
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # nothing fetched
    for plot in PLOTS:
        assert f'id="{plot}"' in html and html.split(f'id="{plot}"', 1)[1].lstrip(">\n").startswith("<svg")
    for artifact in manifest["artifacts"]:
        assert artifact["path"] in html


def test_headless_chromium_renders_the_report(tiny_release, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium here: apt-get install chromium (.ci/run does)")
    page = tiny_release.out / "report.html"
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
               "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*command, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for plot in PLOTS:
        assert f'id="{plot}"' in dom.stdout
    assert dom.stdout.count("<svg") >= len(PLOTS)
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    shot = tmp_path / "report.png"
    subprocess.run([*command, f"--screenshot={shot}", "--window-size=1200,2600", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
