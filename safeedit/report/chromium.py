"""Headless Chromium (Debian package `chromium`) renders the HTML report to PDF and to PNG screenshots.

Chromium runs with a throw-away profile, no network use (the report is a file:// page with everything inline)
and `--no-sandbox` (needed as root in containers; the page is our own, escaped report).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from safeedit.errors import SafeEditError
from safeedit.io import atomic_path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
TIMEOUT_S = 120


def find_chromium() -> str | None:
    """The Chromium executable: $SAFEEDIT_CHROMIUM, else the first of CANDIDATES on PATH."""
    configured = os.environ.get("SAFEEDIT_CHROMIUM")
    if configured:
        return configured if shutil.which(configured) else None
    return next((found for name in CANDIDATES if (found := shutil.which(name))), None)


def _run(arguments: list[str], html: Path, out: Path, what: str) -> Path:
    executable = find_chromium()
    if executable is None:
        raise SafeEditError(
            f"cannot write {what}: Chromium is not installed; run `sudo apt-get install chromium` "
            "(or set SAFEEDIT_CHROMIUM), or pass --no-pdf"
        )
    with (tempfile.TemporaryDirectory(prefix="safeedit-chromium-") as profile,
          atomic_path(out, suffix=f".tmp{out.suffix}") as partial):
        command = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                   "--no-first-run", "--disable-extensions", "--disable-background-networking",
                   f"--user-data-dir={profile}", *[a.format(out=partial) for a in arguments],
                   Path(html).resolve().as_uri()]
        try:
            finished = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise SafeEditError(f"Chromium did not finish {what} within {TIMEOUT_S} s") from None
        if finished.returncode != 0 or not Path(partial).is_file() or Path(partial).stat().st_size == 0:
            last = (finished.stderr.strip().splitlines() or ["no output"])[-1]
            raise SafeEditError(f"Chromium failed to write {what} (exit {finished.returncode}): {last}")
    return out


def html_to_pdf(html: str | os.PathLike, pdf: str | os.PathLike) -> Path:
    """Print `html` to `pdf` (A4, no browser header or footer), atomically."""
    return _run(["--no-pdf-header-footer", "--print-to-pdf={out}"], Path(html), Path(pdf), "the PDF report")


def screenshot(html: str | os.PathLike, png: str | os.PathLike, width: int = 1000, height: int = 1400) -> Path:
    """A PNG of the first `width`×`height` CSS pixels of `html`, as a reader first sees it."""
    return _run([f"--window-size={width},{height}", "--hide-scrollbars", "--screenshot={out}"], Path(html),
                Path(png), "the screenshot")
