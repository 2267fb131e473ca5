"""The admin in Chromium against the real relay: log in, the SMTP settings and sessions pages,
a cross-origin POST from another loopback origin, session expiry, login lockout."""
from __future__ import annotations

import asyncio
import time

from aiohttp import web

from tests.browser.conftest import ADMIN_PW, base_url, check_page, login, start_admin_relay


async def test_login_then_settings_and_sessions_pages(make_relay, page):
    inst = start_admin_relay(make_relay).start()
    await page.goto(base_url(inst) + "/")
    assert page.url.endswith("/login")
    await check_page(page, "login")
    await login(page, inst)
    await page.goto(base_url(inst) + "/settings")
    assert await page.get_by_role("heading", name="SMTP settings").is_visible()
    text = await page.locator("main").inner_text()
    assert "relay.test" in text and "TLS required before AUTH" in text and "mailbox provider" in text
    assert str(inst.ports["starttls"]) in text and str(inst.ports["implicit"]) in text
    await check_page(page, "settings")
    await page.get_by_role("link", name="Sessions").click()
    assert await page.get_by_text("(this one)").is_visible()
    await check_page(page, "sessions")
    cookies = await page.context.cookies()
    (c,) = [c for c in cookies if c["name"] == "__Host-relay_admin"]
    assert c["secure"] and c["httpOnly"] and c["sameSite"] == "Strict" and c["path"] == "/"
    await page.get_by_role("button", name="Log out", exact=True).click()
    await page.wait_for_url("**/login")
    await page.goto(base_url(inst) + "/sessions")
    assert page.url.endswith("/login")


async def test_a_post_from_another_loopback_origin_is_refused(make_relay, page):
    inst = start_admin_relay(make_relay).start()
    target = base_url(inst)
    evil_html = (f'<!doctype html><html lang="en"><title>evil</title><body>'
                 f'<form method="post" action="{target}/login">'
                 f'<input name="username" value="boss"><input name="password" value="{ADMIN_PW}">'
                 f'<button type="submit">win a prize</button></form></body></html>')

    async def evil(_request):
        return web.Response(text=evil_html, content_type="text/html")
    app = web.Application()
    app.router.add_get("/", evil)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.2", 0)
    await site.start()
    try:
        evil_port = runner.addresses[0][1]
        await page.goto(f"http://127.0.0.2:{evil_port}/")
        async with page.expect_response(f"{target}/login") as info:
            await page.get_by_role("button", name="win a prize").click()
        resp = await info.value
        assert resp.status == 403
        assert "cross-site request refused" in await page.content()
        assert resp.request.headers.get("origin") == f"http://127.0.0.2:{evil_port}"
        # Nothing logged in: no session cookie was set.
        assert not [c for c in await page.context.cookies() if c["name"] == "__Host-relay_admin"]
        assert inst.events_named("admin_login") == []
    finally:
        await runner.cleanup()


async def test_a_session_past_its_absolute_timeout_is_sent_back_to_login(make_relay, page):
    inst = start_admin_relay(make_relay, {"session_absolute_timeout": 2}).start()
    await login(page, inst)
    await page.goto(base_url(inst) + "/settings")
    assert page.url.endswith("/settings")
    deadline = time.monotonic() + 20
    for _ in range(100):  # bounded in count and in time
        await page.goto(base_url(inst) + "/settings")
        if page.url.endswith("/login") or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.3)
    assert page.url.endswith("/login"), "the session outlived session_absolute_timeout"


async def test_login_lockout_after_the_failures_even_with_the_right_password(make_relay, page):
    inst = start_admin_relay(make_relay, {"login_failures": 3}).start()
    for _ in range(3):
        await login(page, inst, password="not the password")
        assert await page.get_by_role("alert").inner_text() == "Wrong admin name or password."
    await login(page, inst)  # the right one, too late
    assert "Too many failed logins" in await page.get_by_role("alert").inner_text()
    await check_page(page, "login_locked")
    assert page.url.endswith("/login")
    assert len(inst.events_named("admin_auth_failed", user="boss")) == 3


async def test_without_an_admin_the_page_says_how_to_make_one(make_relay, page):
    inst = make_relay(config={"admin": {"listen": "127.0.0.1:0"}})
    resp = await page.goto(base_url(inst) + "/")
    assert resp.status == 503
    assert "relay admin add NAME" in await page.locator("main").inner_text()
    await check_page(page, "setup")
