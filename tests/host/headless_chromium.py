"""What the browser tests share: Debian's chromium driven headless by Playwright, and closing dialogs."""

from __future__ import annotations

import pathlib

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = pathlib.Path(__file__).resolve().parents[1] / "artifacts" / "browser"

VISIBLE_DIALOGS = """() => Array.from(document.querySelectorAll('.p-dialog'))
  .filter(d => d.getClientRects().length > 0)
  .map(d => d.innerText.trim())"""


def require_playwright():
    """Playwright's sync_playwright; fails the test (never skips) with the fix when chromium or playwright is missing."""
    if not pathlib.Path(CHROMIUM).exists():
        pytest.fail(f"chromium not found at {CHROMIUM}: run `make browser` (installs Debian's chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.fail(f"the playwright package is missing ({e}): run `make setup` and `make browser`")
    return sync_playwright


def launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


def close_dialogs(page, rounds: int = 4) -> None:
    """Close whatever dialog is open (the first-run Templates dialog, a previous workflow's warning)."""
    for _ in range(rounds):
        if not page.evaluate(VISIBLE_DIALOGS):
            return
        close = page.locator(".p-dialog button:has(i.pi-times)")
        if close.count():
            close.first.click()
        else:
            page.keyboard.press("Escape")
        page.wait_for_timeout(300)
