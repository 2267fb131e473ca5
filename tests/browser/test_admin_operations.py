"""The hosted provider's flow in Chromium against the real relay: five SMTP users, the sixth
refused by the server; a password shown once that then authenticates over STARTTLS; reset
(the old password fails at the next AUTH); delete (AUTH fails); the queue's Retry now and
Delete against a real sink; hostile text from mail rendered inert."""
from __future__ import annotations

import asyncio
import smtplib

from tests.browser.conftest import base_url, check_page, login, start_admin_relay
from tests.conftest import PASSWORD, USER
from tests.support.mx_sink import MXSink
from tests.support.relay_instance import wait_until

DOMAIN = "mg.example.com"


def auth_ok(inst, username: str, password: str) -> bool:
    s = inst.smtp()  # STARTTLS done: AUTH is only offered after it
    try:
        s.login(username, password)
        return True
    except smtplib.SMTPAuthenticationError:
        return False
    finally:
        try:
            s.quit()
        except smtplib.SMTPException:
            pass


async def open_popover(page, button_name: str):
    await page.get_by_role("button", name=button_name, exact=True).click()
    dialog = page.locator("[popover]:popover-open")
    await dialog.wait_for(state="visible")
    return dialog


async def create_user(page, local: str):
    dialog = await open_popover(page, "Create New SMTP User")
    await dialog.get_by_label(f"Username (before @{DOMAIN})").fill(local)
    async with page.expect_response(lambda r: r.request.method == "POST") as info:
        await dialog.get_by_role("button", name="Create", exact=True).click()
    return await info.value


async def test_five_credentials_then_refused_shown_once_reset_delete_with_real_auth(make_relay, page):
    inst = start_admin_relay(make_relay)
    inst.cli("domain", "add", DOMAIN, "--no-dkim", check=True)
    inst.start()
    await login(page, inst)
    await page.goto(base_url(inst) + "/domains")
    await check_page(page, "domains")
    await page.get_by_role("link", name=f"SMTP settings for {DOMAIN}").click()
    assert await page.get_by_role("heading", name="SMTP credentials: 0 of 5").is_visible()
    await open_popover(page, "Create New SMTP User")
    await check_page(page, "credentials_create_popup")
    await page.keyboard.press("Escape")

    passwords = {}
    for i in range(5):
        resp = await create_user(page, f"app{i}")
        assert resp.status == 201 and resp.headers["cache-control"] == "no-store"
        shown = (await page.locator("#new-password-value").inner_text()).strip()
        assert len(shown) >= 20
        passwords[f"app{i}@{DOMAIN}"] = shown
        if i == 0:
            await check_page(page, "credentials_password_shown")
    first = f"app0@{DOMAIN}"
    assert await page.get_by_role("heading", name="SMTP credentials: 5 of 5").is_visible()
    create = page.get_by_role("button", name="Create New SMTP User", exact=True)
    assert await create.is_disabled()
    assert "limit of 5 credentials" in await page.locator("#full-note").inner_text()

    # The sixth, submitted anyway (the form is still in the page): the server refuses it.
    async with page.expect_response(lambda r: r.request.method == "POST") as info:
        await page.evaluate("""() => { const f = document.querySelector('#create-user form');
                                       f.querySelector('[name=local]').value = 'app5'; f.requestSubmit(); }""")
    resp = await info.value
    assert resp.status == 409
    assert "limit" in (await page.get_by_role("alert").inner_text()).lower()
    assert f"app5@{DOMAIN}" not in inst.cli("user", "list", DOMAIN).stdout

    # Shown once: a fresh GET of the page has no password in it.
    await page.goto(base_url(inst) + f"/domains/{DOMAIN}/credentials")
    html = await page.content()
    assert not [p for p in passwords.values() if p in html]
    await check_page(page, "credentials_full")

    # The shown password works on the real relay's STARTTLS port.
    assert await asyncio.to_thread(auth_ok, inst, first, passwords[first])

    # Reset: the old password fails at the next AUTH, the new one works.
    dialog = await open_popover(page, f"Reset Password of {first}")
    await check_page(page, "credentials_reset_popup")
    await dialog.get_by_role("button", name="Reset", exact=True).click()
    await page.locator("#new-password-value").wait_for()
    new = (await page.locator("#new-password-value").inner_text()).strip()
    assert new != passwords[first]
    assert not await asyncio.to_thread(auth_ok, inst, first, passwords[first])
    assert await asyncio.to_thread(auth_ok, inst, first, new)
    # Both show in the table: last used, and the old password's failed login.
    row = page.get_by_role("row").filter(has_text=first)
    for _ in range(50):  # written in batches (about once a second): bounded wait
        await page.goto(base_url(inst) + f"/domains/{DOMAIN}/credentials")
        cells = await row.get_by_role("cell").all_inner_texts()
        if cells[3] != "never" and cells[4] != "never":
            break
        await asyncio.sleep(0.2)
    assert cells[3].endswith("ago") and cells[4].endswith("ago"), cells

    # Delete, with its confirmation: AUTH fails, and there is room for one more.
    dialog = await open_popover(page, f"Delete {first}")
    assert f"Delete {first}?" in await dialog.inner_text()
    await check_page(page, "credentials_delete_popup")
    await dialog.get_by_role("button", name=f"Yes, delete {first}").click()
    await page.get_by_role("status").filter(has_text=f"Deleted {first}").wait_for()
    assert not await asyncio.to_thread(auth_ok, inst, first, new)
    assert await page.get_by_role("heading", name="SMTP credentials: 4 of 5").is_visible()
    assert await create.is_enabled()

    # Every change is in the audit log, by this admin, via the web.
    await page.goto(base_url(inst) + "/audit")
    text = await page.locator("main").inner_text()
    for action in ("credential.create", "credential.reset", "credential.delete"):
        assert action in text
    assert "boss" in text and "web" in text
    await check_page(page, "audit")
    assert [e for e in page.console_errors if "409" not in e] == [], page.console_errors  # the sixth's 409 only


HOSTILE = '<script>alert(1)</script><img src=x onerror=alert(2)>'


async def test_queue_retry_and_delete_against_a_real_sink(make_relay, dns_server, page):
    with MXSink() as sink:
        dns_server.set("mx.example.net", "A", ["127.0.0.1"])
        dns_server.set("example.net", "MX", ["10 mx.example.net."])
        dns_server.set(DOMAIN, "MX", ["10 mx.example.net."])
        inst = start_admin_relay(make_relay, dns=dns_server.address, mx_port=sink.port,
                                 config={"delivery": {"retry_schedule": [3600]}})
        inst.add_user(USER, PASSWORD)
        inst.start()
        sink.rcpt_replies["bob@example.net"] = "451 4.2.0 " + HOSTILE
        qids = {}
        for subject in ("keep", "drop", "bounce"):
            data = f"From: {USER}\r\nTo: bob@example.net\r\nSubject: {subject} {HOSTILE}\r\n\r\nhello\r\n"
            qids[subject] = await asyncio.to_thread(inst.submit, USER, PASSWORD, USER, ["bob@example.net"], data)
            assert await asyncio.to_thread(inst.wait_event, "delivery", 10, 1, qid=qids[subject], result="deferred")
        await login(page, inst)
        await page.goto(base_url(inst) + "/queue")
        for qid in qids.values():
            assert await page.get_by_role("link", name=qid).is_visible()
        # The remote reply is shown as text, not markup.
        assert "<script>alert(1)</script>" in await page.locator("main").inner_text()
        assert await page.locator("main script, main img").count() == 0
        await check_page(page, "queue")

        # Filters: by queue id, by recipient, by state.
        await page.get_by_label("Queue id").fill(qids["keep"])
        await page.get_by_role("button", name="Filter").click()
        await page.wait_for_url("**/queue?*")
        assert await page.get_by_role("link", name=qids["keep"]).is_visible()
        assert await page.get_by_role("link", name=qids["drop"]).count() == 0
        await page.goto(base_url(inst) + "/queue?state=delivered")
        assert "Nothing matches." in await page.locator("main").inner_text()

        # The message page: envelope, the header block (hostile subject inert), every attempt.
        await page.goto(base_url(inst) + f"/queue/{qids['keep']}")
        text = await page.locator("main").inner_text()
        assert USER in text and "bob@example.net" in text and "mx.example.net" in text
        assert f"Subject: keep {HOSTILE}" in text and "deferred" in text and "451 4.2.0" in text
        assert await page.locator("main script, main img").count() == 0
        await check_page(page, "message")

        # Retry now: the sink accepts this time; the message is delivered.
        sink.rcpt_replies.pop("bob@example.net")
        await page.get_by_role("button", name="Retry now", exact=True).click()
        await page.get_by_role("status").wait_for()
        assert await asyncio.to_thread(sink.wait_for, 1, 15)
        assert f"Subject: keep" in sink.messages[0].data.decode()
        assert await asyncio.to_thread(inst.wait_event, "delivery", 10, 1, qid=qids["keep"], result="delivered")

        # Delete, confirmed in its pop-up, without a bounce: gone, nothing sent.
        await page.goto(base_url(inst) + "/queue")
        row = page.get_by_role("row").filter(has=page.get_by_role("link", name=qids["drop"]))
        await row.get_by_role("button", name=f"Delete {qids['drop']}").click()
        dialog = page.locator("[popover]:popover-open")
        await dialog.wait_for(state="visible")
        await check_page(page, "queue_delete_popup")
        await dialog.get_by_role("button", name="Delete", exact=True).click()
        await page.get_by_role("status").filter(has_text=f"{qids['drop']} deleted").wait_for()
        assert len(sink.messages) == 1

        # Delete and bounce: the sender gets a failure report (RFC 3464) through the sink.
        row = page.get_by_role("row").filter(has=page.get_by_role("link", name=qids["bounce"]))
        await row.get_by_role("button", name=f"Delete {qids['bounce']}").click()
        dialog = page.locator("[popover]:popover-open")
        await dialog.get_by_role("button", name="Delete and bounce").click()
        await page.get_by_role("status").filter(has_text="sender notified").wait_for()
        assert await asyncio.to_thread(sink.wait_for, 2, 15)
        dsn = sink.messages[1]
        assert dsn.rcpt_tos == [USER] and b"deleted from the queue by the administrator" in dsn.data
        wait_until(lambda: not inst.queued(), what="an empty queue")
        await page.goto(base_url(inst) + "/audit")
        text = await page.locator("main").inner_text()
        assert "queue.retry" in text and "queue.delete" in text


async def test_domain_dns_check_expected_vs_found_and_zone_snippet(make_relay, dns_server, page, tmp_path):
    import json
    inst = start_admin_relay(make_relay, dns=dns_server.address,
                             config={"domains": {"public_addresses": ["192.0.2.1"]}})
    inst.cli("domain", "add", DOMAIN, "--dkim-algorithm", "ed25519", check=True)
    inst.start()
    recs = json.loads(inst.cli("domain", "dns", DOMAIN, "--json", check=True).stdout)
    spf = next(r for r in recs if r["purpose"] == "SPF")
    dkim = next(r for r in recs if r["purpose"].startswith("DKIM"))
    dns_server.set(spf["name"], "TXT", [spf["value"]])
    dns_server.set(dkim["name"], "TXT", [dkim["value"]])
    await login(page, inst)
    await page.goto(base_url(inst) + f"/domains/{DOMAIN}")
    assert "Not checked since the relay started" in await page.locator("main").inner_text()
    await page.get_by_role("button", name="Check now").click()
    await page.get_by_text("Last checked").wait_for()
    chips = await page.get_by_role("list", name="DNS status").inner_text()
    assert "SPF: ok" in chips and "DKIM: ok" in chips and "DMARC: not published" in chips
    assert "verified" in await page.locator("main").inner_text()
    await check_page(page, "domain_checked")

    # Found differs from expected: the chip says so, and the found value is shown beside it.
    dns_server.set(spf["name"], "TXT", ["v=spf1 -all"])
    await page.get_by_role("button", name="Check now").click()
    await page.get_by_text("v=spf1 -all").wait_for()
    chips = await page.get_by_role("list", name="DNS status").inner_text()
    assert "SPF: mismatch" in chips and "DKIM: ok" in chips
    await page.goto(base_url(inst) + "/domains")
    row = await page.get_by_role("row").filter(has_text=DOMAIN).inner_text()
    assert "SPF: mismatch" in row and "0 of 5" in row

    await page.goto(base_url(inst) + f"/domains/{DOMAIN}")
    async with page.expect_download() as info:
        await page.get_by_role("link", name="Download zone snippet").click()
    download = await info.value
    assert download.suggested_filename == f"{DOMAIN}.zone"
    path = tmp_path / "zone.txt"
    await download.save_as(path)
    zone = path.read_text()
    assert dkim["name"].split(".")[0] in zone and "v=spf1" in zone
