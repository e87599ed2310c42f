"""Render a report in headless Chromium: a screenshot, and a count of the images the browser decoded.

Chromium is not a dependency; on Debian/Ubuntu ``apt-get install chromium`` provides it. Used by
``bonsai report RUN --screenshot PNG`` and by the browser test.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from bonsai.errors import BonsaiError

_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run", "--disable-extensions"]
# appended to a copy of the page: once loaded, the body records how many <img> there are and how many decoded
_PROBE = (
    "<script>window.addEventListener('load',()=>{const i=[...document.images];"
    "document.body.setAttribute('data-images',i.length+'/'+i.filter(x=>x.complete&&x.naturalWidth>0).length)});</script>"
)


def find_chromium() -> str | None:
    for name in _NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _chromium() -> str:
    path = find_chromium()
    if path is None:
        raise BonsaiError("no Chromium or Chrome found on PATH (on Debian/Ubuntu: apt-get install chromium)")
    return path


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="bonsai-chromium-") as profile:
        cmd = [_chromium(), *_FLAGS, f"--user-data-dir={profile}", *args]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BonsaiError(f"Chromium did not finish within {timeout:.0f} s") from None


def screenshot(page: str | Path, png: str | Path, width: int = 1200, height: int | None = None, timeout: float = 120) -> Path:
    """Save a PNG of ``page`` as Chromium draws it, ``width`` pixels wide; ``height`` None: tall enough for a
    report (estimated from its figures)."""
    page, png = Path(page).resolve(), Path(png).resolve()
    if not page.is_file():
        raise BonsaiError(f"{page}: no such file")
    if height is None:
        text = page.read_text(encoding="utf-8", errors="replace")
        height = 1200 + 520 * text.count("<img") + 30 * text.count("<tr>") + 16 * text.count("\n", text.find("<pre>"))
    png.unlink(missing_ok=True)  # a PNG from an earlier call must not pass for this one
    r = _run([f"--window-size={width},{height}", f"--screenshot={png}", "--virtual-time-budget=10000", page.as_uri()], timeout)
    if r.returncode != 0 or not png.is_file():
        raise BonsaiError(f"{page}: Chromium wrote no screenshot ({(r.stderr.strip().splitlines() or ['no output'])[-1]})")
    return png


def decoded_images(page: str | Path, timeout: float = 120) -> tuple[int, int]:
    """(images on the page, images Chromium loaded and decoded) after the page's load event."""
    page = Path(page)
    with tempfile.TemporaryDirectory(prefix="bonsai-probe-") as tmp:
        probe = Path(tmp) / "probe.html"
        probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"), encoding="utf-8")
        r = _run(["--dump-dom", "--virtual-time-budget=10000", probe.as_uri()], timeout)
    m = re.search(r'data-images="(\d+)/(\d+)"', r.stdout)
    if m is None:
        raise BonsaiError(f"{page}: Chromium did not report the page's images ({(r.stderr.strip().splitlines() or ['no output'])[-1]})")
    return int(m.group(1)), int(m.group(2))
