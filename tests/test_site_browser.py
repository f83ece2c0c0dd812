"""The results site in a real browser: headless Chromium (Debian's ``chromium`` package, started by this test)
driven by Playwright over the site that `kdbench site` makes of every published snapshot.

Every page, at 1400 px and at 420 px wide: loads with no console error and no request leaving the machine,
every link resolves (a file beside it, an anchor on its page), every image decodes, no table is wider than the
1400 px window and at 420 px no page scrolls sideways. Screenshots of the front page and of a table at both
widths are written under the test's temporary folder, or into $KDBENCH_SCREENSHOTS (their paths are printed).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from kdbench.report.site import snapshot_entries, write_site

CHROMIUM = os.environ.get("KDBENCH_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium (Debian: apt-get install chromium; or set KDBENCH_CHROMIUM to its binary)"
)

PUBLISHED = Path(__file__).resolve().parents[1] / "results" / "published"
WIDTHS = (1400, 420)
SHOT_TABLE = "fashion-mnist-indistill"  # the widest table of the issue

_MEASURE = """() => ({
  scroll: document.scrollingElement.scrollWidth,
  width: document.documentElement.clientWidth,
  tables: [...document.querySelectorAll('table')].map(t => Math.ceil(t.getBoundingClientRect().width)),
  broken: [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
  links: [...document.querySelectorAll('a[href]')].map(a => a.href),
  ids: [...document.querySelectorAll('[id]')].map(e => e.id),
})"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every published snapshot copied and rebuilt into a site by `kdbench site`'s code."""
    root = tmp_path_factory.mktemp("site")
    for entry in snapshot_entries(PUBLISHED):
        shutil.copytree(entry.source, root / entry.name)
    write_site(snapshot_entries(root), root)
    return root


def test_every_page_in_chromium(site: Path, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    pages = [site / "index.html", *sorted(site.glob("*/index.html"))]
    assert len(pages) == 1 + len(snapshot_entries(PUBLISHED))
    problems: list[str] = []
    shots = Path(os.environ.get("KDBENCH_SCREENSHOTS") or tmp_path / "screenshots")  # (a folder to keep them in)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            for width in WIDTHS:
                context = browser.new_context(viewport={"width": width, "height": 900})
                outside: list[str] = []

                def route(r, outside=outside):  # nothing but the site's own files and inline data
                    if r.request.url.startswith(("file://", "data:")):
                        return r.continue_()
                    outside.append(r.request.url)
                    return r.abort()

                context.route("**/*", route)
                page = context.new_page()
                errors: list[str] = []
                page.on("console", lambda m, errors=errors: errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
                for path in pages:
                    where = f"{path.relative_to(site)} at {width} px"
                    errors.clear()
                    page.goto(path.as_uri(), wait_until="load")
                    m = page.evaluate(_MEASURE)
                    problems += [f"{where}: console error {e}" for e in errors]
                    problems += [f"{where}: image {alt!r} does not decode" for alt in m["broken"]]
                    if width == 1400:
                        problems += [f"{where}: a table {w} px wide" for w in m["tables"] if w > 1400]
                    elif m["scroll"] > m["width"]:
                        problems.append(f"{where}: scrolls sideways ({m['scroll']} px in {m['width']})")
                    for link in m["links"]:
                        url = urlparse(link)
                        if url.scheme != "file":
                            problems.append(f"{where}: link {link} leaves the site")
                        elif not Path(unquote(url.path)).is_file():
                            problems.append(f"{where}: link {link} resolves to nothing")
                        elif url.fragment and Path(unquote(url.path)) == path and url.fragment not in m["ids"]:
                            problems.append(f"{where}: no #{url.fragment} on the page")
                    if path.parent.name in ("site", SHOT_TABLE) or path == site / "index.html":
                        name = "front" if path == site / "index.html" else path.parent.name
                        page.screenshot(path=str(shots / f"{name}-{width}.png"), full_page=width == 1400)
                problems += [f"a request left the machine: {u}" for u in outside]
                context.close()
        finally:
            browser.close()
    taken = [shots / f"{name}-{width}.png" for name in ("front", SHOT_TABLE) for width in WIDTHS]
    print("screenshots:", *map(str, taken), sep="\n  ")
    assert all(p.is_file() for p in taken)
    assert not problems, "\n".join(problems)
