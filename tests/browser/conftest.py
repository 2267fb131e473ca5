"""Browser tests: PyPI Playwright (async API) driving Debian's /usr/bin/chromium against the real
relay process (RelayInstance with [admin] listen on a free loopback port). Nothing is
downloaded: `executable_path` points at the apt browser. Absent browser or playwright: skip,
or fail under RELAY_REQUIRE_TOOLS=1 (tests/support/tools.py).

Every page a test visits can be passed to `check_page`: a full-page screenshot under
test-artifacts/ (gitignored) and an axe-core run (axe.min.js from axe-playwright-python)
with no serious or critical violation allowed."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support import tools

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
ADMIN, ADMIN_PW = "boss", "a long admin password"
TIMEOUT_MS = 15_000


@pytest.fixture
async def browser():
    path = tools.chromium()
    from playwright.async_api import async_playwright
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=path, args=ARGS, headless=True, timeout=TIMEOUT_MS)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def page(browser):
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    pg = await context.new_page()
    errors: list[str] = []
    # A CSP violation (an inline style or script slipping in) shows up as a console error.
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.console_errors = errors
    try:
        yield pg
    finally:
        await context.close()


def admin_config(**admin) -> dict:
    return {"admin": {"listen": "127.0.0.1:0", **admin}}


def start_admin_relay(make_relay, admin: dict | None = None, **kwargs):
    cfg = kwargs.pop("config", {})
    inst = make_relay(start=False, config={**cfg, **admin_config(**(admin or {}))}, **kwargs)
    inst.cli("admin", "add", ADMIN, "--password-stdin", input=ADMIN_PW + "\n", check=True)
    return inst


def base_url(inst) -> str:
    return f"http://127.0.0.1:{inst.ports['admin']}"


async def login(page, inst, name: str = ADMIN, password: str = ADMIN_PW) -> None:
    await page.goto(base_url(inst) + "/login")
    await page.get_by_label("Admin name").fill(name)
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name="Log in").click()
    await page.wait_for_load_state()


async def check_page(page, name: str) -> None:
    """Screenshot to test-artifacts/<name>.png, then axe-core: no serious/critical violations."""
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{re.sub(r'[^a-z0-9_-]', '_', name.lower())}.png"), full_page=True)
    from axe_playwright_python.async_playwright import Axe
    results = await Axe().run(page)
    bad = [(v["id"], v["impact"], [n["target"] for n in v["nodes"]][:3])
           for v in results.response["violations"] if v["impact"] in ("serious", "critical")]
    assert not bad, f"{name}: axe violations {bad}"
    assert not [e for e in page.console_errors if "Content Security Policy" in e], page.console_errors
