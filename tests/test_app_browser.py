"""The app in a real browser: Playwright drives Debian's Chromium against the running app.

Uploads an image, asks two questions and watches both answers stream in (the text grows
on screen), presses Stop during a long answer, checks that user text cannot inject HTML
and that a refused message shows its error, and saves a 1366x768 screenshot (a laptop
screen) under the test's tmp folder. Chromium comes from the system (apt's `chromium`),
never from Playwright's own download.
"""

import shutil
import time
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright

from app_helpers import APP_MODEL_SIZES, EXAMPLES, app_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
LAPTOP = {"width": 1366, "height": 768}
PICTURE = EXAMPLES / "red_circle_blue_square.png"


@pytest.fixture(scope="module")
def browser_page(tiny_checkpoints):
    assert shutil.which(CHROMIUM), f"{CHROMIUM} is missing: apt-get install -y chromium"
    server = app_for(tiny_checkpoints("instructblip-llama", **APP_MODEL_SIZES))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)

        def new_page() -> Page:
            page = browser.new_page(viewport=LAPTOP)
            page.goto(server.url)
            page.wait_for_selector("#chat-input textarea", timeout=60_000)
            return page

        yield new_page
        browser.close()


def bot_texts(page: Page) -> list[str]:
    """The answers on screen, notices ("Note: ...", e.g. earlier turns left out) left out."""
    texts = page.eval_on_selector_all('#chatbot [data-testid="bot"]', "nodes => nodes.map(n => n.innerText)")
    return [t for t in texts if not t.startswith("Note:")]


def status(page: Page) -> str:
    return page.inner_text("#status")


def set_slider(page: Page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def send(page: Page, text: str, image: Path | None = None) -> None:
    if image is not None:
        page.set_input_files("#chat-input input[type=file]", str(image))
        page.wait_for_selector("#chat-input img", timeout=10_000)  # the thumbnail: upload done
    page.fill("#chat-input textarea", text)
    page.press("#chat-input textarea", "Enter")


def watch_answer(page: Page, turn: int, timeout: float = 60) -> list[str]:
    """The texts of answer `turn` (0-based) seen on screen until the status says it ended."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        texts = bot_texts(page)
        if len(texts) > turn and (not seen or texts[turn] != seen[-1]):
            seen.append(texts[turn])
        if len(texts) > turn and status(page).startswith(("Answered", "Stopped")):
            return seen
        time.sleep(0.01)
    raise AssertionError(f"answer {turn} did not end within {timeout} s; saw {seen[-1:]}")


def test_upload_two_streamed_answers_stop_and_screenshot(browser_page, tmp_path):
    page = browser_page()
    page.click("#settings .label-wrap")  # open the settings panel
    set_slider(page, "max-new-tokens", 60)
    set_slider(page, "min-new-tokens", 60)  # long enough (~1 s) to be seen growing

    send(page, "What colour is the circle?", PICTURE)
    first = watch_answer(page, 0)
    send(page, "What colour is the square?")
    second = watch_answer(page, 1)
    for seen in (first, second):
        growing = [t for t in seen if t.strip()]
        assert len(growing) >= 3, f"the answer did not stream: {seen}"
        assert all(b.startswith(a) for a, b in zip(growing, growing[1:])), growing
    assert page.locator("#chatbot img").count() >= 1  # the uploaded picture is in the conversation
    assert page.locator("#look img").count() == 1  # and where the Q-Former looked, beside it

    set_slider(page, "max-new-tokens", 450)
    set_slider(page, "min-new-tokens", 450)  # ~7 s of decoding if nobody stops it
    send(page, "Describe the image in detail.")
    deadline = time.monotonic() + 30
    while not (len(bot_texts(page)) == 3 and bot_texts(page)[2].strip()):  # it is writing
        assert time.monotonic() < deadline, "the long answer did not start"
        time.sleep(0.01)
    pressed = time.monotonic()
    page.click("#stop-button")
    page.wait_for_function("() => document.querySelector('#status').innerText.startsWith('Stopped')", timeout=10_000)
    assert time.monotonic() - pressed < 3.0
    assert bot_texts(page)[2].rstrip().endswith("■ stopped")

    page.click("#settings .label-wrap")  # fold the settings away for the picture
    page.evaluate("window.scrollTo(0, 0)")
    time.sleep(0.5)
    screenshot = tmp_path / "app.png"
    page.screenshot(path=str(screenshot))
    print(f"screenshot: {screenshot}")
    assert screenshot.stat().st_size > 20_000


def test_user_text_cannot_inject_html_and_errors_are_shown(browser_page):
    page = browser_page()
    attack = 'What is this? <img src=x onerror="window.__injected=1"> <script>window.__injected=2</script>'
    send(page, attack, PICTURE)
    watch_answer(page, 0)
    shown = page.inner_text('#chatbot [data-testid="user"]:not(:has(img))')
    assert '<img src=x onerror="window.__injected=1">' in shown and "<script>" in shown
    assert page.evaluate("window.__injected") is None
    assert page.locator('#chatbot img[src="x"], #chatbot script').count() == 0

    send(page, "x" * 1001)
    toast = page.wait_for_selector("text=The message is 1,001 characters long", timeout=10_000)
    assert toast.is_visible()
    assert page.input_value("#chat-input textarea") == "x" * 1001  # kept, to be shortened
