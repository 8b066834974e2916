"""What the browser tests share: Debian's chromium driven headless by Playwright, opening the frontend, closing dialogs."""

from __future__ import annotations

import pathlib

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = pathlib.Path(__file__).resolve().parents[1] / "artifacts" / "browser"

# A dialog in either frontend: PrimeVue's .p-dialog (1.30.x: templates, missing nodes, load errors) or any
# other modal with role="dialog" (1.48.x opens its Templates dialog with reka-ui, which has no .p-dialog).
DIALOGS = '.p-dialog, [role="dialog"]'
VISIBLE_DIALOGS = f"""() => Array.from(document.querySelectorAll('{DIALOGS}'))
  .filter(d => d.getClientRects().length > 0)
  .map(d => d.innerText.trim())"""
FIRST_RUN_DIALOG_WAIT_MS = 8000


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


def open_frontend(page, url: str) -> None:
    """Load the host's frontend and wait for the app; close the first-run Templates dialog if it shows up.

    The frontend opens that dialog a moment after the app, once per user (it then stores
    Comfy.TutorialCompleted on the server), so it is waited for but not required.
    """
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_function("window.app && window.app.graph", timeout=60_000)
    try:
        page.wait_for_function(f"({VISIBLE_DIALOGS})().length > 0", timeout=FIRST_RUN_DIALOG_WAIT_MS)
    except Exception:
        pass
    close_dialogs(page)


def frontend_version(page) -> tuple[int, ...]:
    """The running frontend's version (comfyui-frontend-package), e.g. (1, 48, 7)."""
    text = page.evaluate("window.__COMFYUI_FRONTEND_VERSION__ || ''")
    parts = tuple(int(p) for p in text.split("-")[0].split(".") if p.isdigit())
    assert len(parts) == 3, f"the page reports no frontend version (window.__COMFYUI_FRONTEND_VERSION__ = {text!r})"
    return parts


def close_dialogs(page, rounds: int = 4) -> None:
    """Close whatever dialog is open (the first-run Templates dialog, a previous workflow's warning)."""
    for _ in range(rounds):
        if not page.evaluate(VISIBLE_DIALOGS):
            return
        close = page.locator(".p-dialog button:has(i.pi-times)")
        if close.count() and close.first.is_visible():
            close.first.click()
        else:
            page.keyboard.press("Escape")
        page.wait_for_timeout(300)
