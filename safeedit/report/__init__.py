"""Compliance reports rendered from run records: HTML (self-contained), PDF (headless Chromium), the record as
JSON with its schema (`schema.json`), `verify_run` for hashes/integrity/signature, Ed25519 signing."""

from safeedit.report.chromium import find_chromium, html_to_pdf, screenshot
from safeedit.report.render import ReportFiles, render_html, write_report
from safeedit.report.verify import Verification, verify_run

__all__ = ["ReportFiles", "Verification", "find_chromium", "html_to_pdf", "render_html", "screenshot", "verify_run",
           "write_report"]
