"""wabridge-sim's web page (sim/page.py) in a real headless Chromium.

Debian's ``chromium`` driven by the ``playwright`` Python package (its own browser downloads
are never used: no ``playwright install``). A real ``SimBackend`` device waits for a scan; the
page shows its QR code, a click links it, a message typed in the contacts panel reaches the
device, and the device's quoted reply shows up on the page; the owner's phone panel writes in
the self chat and in the contact's chat, and the device gets both as own messages. Screenshots go to
``artifacts/sim_page/`` (gitignored).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import TypeVar

import pytest

from agent.whatsapp.base import BackendContext
from agent.whatsapp.events import Connected, Event, IncomingMessage, QrCode
from agent.whatsapp.sim import SimBackend
from sim.server import QR_PNG_SIZE, SimServer

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "artifacts" / "sim_page"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
ACCOUNT, CONTACT = "15550001111", "15550002222"


def _unavailable() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} missing: apt-get install -y chromium"
    try:
        import playwright.async_api  # noqa: F401, PLC0415
    except ImportError:
        return "playwright missing: pip install playwright (never run `playwright install`)"
    return None


REASON = _unavailable()
if REASON is not None:
    print(f"test_sim_page: skipped: {REASON}")
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

E = TypeVar("E", bound=Event)


async def next_event(events: asyncio.Queue[Event], kind: type[E], timeout: float = 10) -> E:
    async def wait() -> E:
        while True:
            event = await events.get()
            if isinstance(event, kind):
                return event

    return await asyncio.wait_for(wait(), timeout)


def zbar_decode(png: bytes, path: Path) -> str | None:
    if shutil.which("zbarimg") is None:
        return None
    path.write_bytes(png)
    proc = subprocess.run(["zbarimg", "--raw", "-q", str(path)], capture_output=True,
                          text=True, timeout=30, check=False)
    return proc.stdout.rstrip("\n")


async def test_link_and_chat_through_the_page(tmp_path: Path) -> None:
    from playwright.async_api import async_playwright, expect  # noqa: PLC0415

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    events: asyncio.Queue[Event] = asyncio.Queue()
    async with SimServer(port=0, qr_rotate=60.0, tick=0.05) as sim:
        backend = SimBackend(BackendContext(user_id="pageuser", state_dir=tmp_path),
                             sim.base_url, backoff_max=0.5)
        backend.start(events.put_nowait)
        try:
            shown = await next_event(events, QrCode)
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(
                    executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
                try:
                    page = await browser.new_page(viewport={"width": 1280, "height": 900})
                    problems: list[str] = []
                    foreign: list[str] = []
                    page.on("pageerror", lambda exc: problems.append(str(exc)))
                    page.on("console", lambda msg: problems.append(msg.text)
                            if msg.type == "error" else None)
                    page.on("request", lambda req: foreign.append(req.url)
                            if not req.url.startswith((sim.base_url, "data:")) else None)
                    page.on("response", lambda resp: problems.append(
                        f"{resp.status} {resp.url}") if resp.status >= 400 else None)
                    await page.goto(sim.base_url + "/")

                    # the phone panel shows the device's current QR code as an image
                    device = page.locator(".device")
                    await expect(device).to_have_count(1)
                    image = device.locator("img.qr")
                    await expect(image).to_have_attribute("data-code", shown.code)
                    await expect(device.locator("code")).to_have_text(shown.code)
                    await page.wait_for_function(
                        "() => { const i = document.querySelector('.device img.qr');"
                        " return i && i.complete && i.naturalWidth > 0; }")
                    assert await image.evaluate("i => i.naturalWidth") == QR_PNG_SIZE
                    src = str(await image.get_attribute("src"))
                    png = await (await page.request.get(sim.base_url + src)).body()
                    decoded = zbar_decode(png, tmp_path / "page-qr.png")
                    if decoded is not None:
                        assert decoded == shown.code
                    await page.screenshot(path=str(ARTIFACTS / "1-waiting-for-scan.png"),
                                          full_page=True)

                    # scan with a phone number -> the device is linked and connected
                    await device.locator("input.phone").fill(ACCOUNT)
                    await device.locator("button.scan").click()
                    connected = await next_event(events, Connected)
                    assert connected.phone == ACCOUNT
                    await expect(page.locator("#phone-status")).to_have_text(
                        f"Linked device #1 to +{ACCOUNT}")
                    await expect(device).to_have_count(0)
                    await expect(page.locator("#devices .empty")).to_be_visible()

                    # a contact writes to the account from the contacts panel
                    await expect(page.locator(f"#account option[value='{ACCOUNT}']")
                                 ).to_have_count(1)
                    await page.select_option("#account", ACCOUNT)
                    await page.fill("#contact", CONTACT)
                    await page.fill("#text", "Hello from the page")
                    await page.click("#send")
                    incoming = await next_event(events, IncomingMessage)
                    assert (incoming.text, incoming.chat_id) == (
                        "Hello from the page", f"{CONTACT}@s.whatsapp.net")
                    mine = page.locator("#conversation .msg.contact")
                    await expect(mine).to_have_count(1)
                    await expect(mine.locator(".text")).to_have_text("Hello from the page")
                    await expect(page.locator("#text")).to_have_value("")

                    # the device replies, quoting it -> the page shows the reply and the quote
                    await backend.send_text(incoming.chat_id, "Hi! You said hello.",
                                            quote=incoming)
                    reply = page.locator("#conversation .msg.account")
                    await expect(reply).to_have_count(1)
                    await expect(reply.locator(".text")).to_have_text("Hi! You said hello.")
                    await expect(reply.locator(".quote")).to_have_text("Hello from the page")
                    await page.screenshot(path=str(ARTIFACTS / "2-conversation.png"),
                                          full_page=True)

                    # the owner's phone writes to itself: the device gets an own message
                    # in the self chat, and its reply shows in the owner's panel
                    me = f"{ACCOUNT}@s.whatsapp.net"
                    await page.select_option("#owner-account", ACCOUNT)
                    await page.fill("#owner-text", "note to self")
                    await page.click("#owner-send")
                    note = await next_event(events, IncomingMessage)
                    assert (note.text, note.chat_id, note.sender, note.from_me) == (
                        "note to self", me, me, True)
                    owner_view = page.locator("#owner-conversation")
                    await expect(owner_view.locator(".msg.owner .text")).to_have_text(
                        "note to self")
                    await backend.send_text(me, "Noted.", quote=note)
                    await expect(owner_view.locator(".msg.account .text")).to_have_text(
                        "Noted.")
                    await expect(owner_view.locator(".msg.account .quote")).to_have_text(
                        "note to self")

                    # ... and in the contact's chat: an own message there, which the
                    # contact's side of the page shows as written on the owner's phone
                    await page.fill("#owner-chat", CONTACT)
                    await page.fill("#owner-text", "I'll take it from here")
                    await page.click("#owner-send")
                    personal = await next_event(events, IncomingMessage)
                    assert (personal.chat_id, personal.from_me) == (
                        f"{CONTACT}@s.whatsapp.net", True)
                    await expect(owner_view.locator(".msg")).to_have_count(3)
                    await expect(owner_view.locator(".msg.contact .text")).to_have_text(
                        "Hello from the page")
                    by_phone = page.locator("#conversation .msg.account").filter(
                        has_text="I'll take it from here")
                    await expect(by_phone.locator(".by")).to_have_text(
                        "written on the owner's phone")
                    await page.screenshot(path=str(ARTIFACTS / "3-owners-phone.png"),
                                          full_page=True)
                    await page.fill("#owner-chat", "12")
                    await page.fill("#owner-text", "x")
                    await page.click("#owner-send")
                    await expect(page.locator("#owner-error")).to_contain_text("6 to 15 digits")

                    # bad input is reported on the page, not thrown
                    await page.fill("#contact", "12")
                    await page.fill("#text", "x")
                    await page.click("#send")
                    await expect(page.locator("#contacts-error")).to_contain_text(
                        "6 to 15 digits")
                    assert problems == [], problems
                    assert foreign == [], f"the page fetched foreign URLs: {foreign}"
                finally:
                    await browser.close()
        finally:
            await backend.stop()


async def test_qr_png_endpoint() -> None:
    import aiohttp  # noqa: PLC0415

    async with SimServer(port=0) as sim, aiohttp.ClientSession(sim.base_url) as http:
        async with http.get("/api/qr.png", params={"code": "sim-qr:abc"}) as resp:
            assert resp.status == 200 and resp.content_type == "image/png"
            body = await resp.read()
            assert body.startswith(b"\x89PNG")
        async with http.get("/api/qr.png") as resp:
            assert resp.status == 400
            assert (await resp.json())["field"] == "code"
        async with http.get("/api/qr.png", params={"code": "x" * 600}) as resp:
            assert resp.status == 400
        async with http.get("/") as resp:
            text = await resp.text()
            assert resp.status == 200 and "<script>" in text
            for external in ("http://", "https://", "//cdn"):
                assert external not in text.replace(
                    "http://www.w3.org", "")  # no external assets of any kind


