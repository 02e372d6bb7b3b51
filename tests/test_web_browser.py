"""``ultragen serve --model tiny-random`` in a real browser: Debian's chromium driven by Playwright (the system
browser; nothing is downloaded). Generate at 512x768, see the guide before the image, Cancel a second run, read
the message of a bad width, and recover. Skips, saying why, where chromium or playwright is missing.

``ULTRAGEN_SCREENSHOT=docs/serve.png python -m pytest tests/test_web_browser.py`` also saves the page for the README.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
START_TIMEOUT_S = 120
# records, in page time, when the guide and the final image first show an <img> (set up before Generate)
WATCH_IMAGES = """() => {
  window.ugSeen = {};
  const seen = () => {
    for (const id of ['ug-guide', 'ug-image']) {
      if (!window.ugSeen[id] && document.querySelector('#' + id + ' img')) window.ugSeen[id] = performance.now();
    }
  };
  new MutationObserver(seen).observe(document.body, {childList: true, subtree: true, attributes: true});
}"""


def _why_no_browser() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"no browser: {CHROMIUM} is missing (apt-get install chromium; .ci/run installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "no browser driver: the playwright package is missing (pip install -e '.[test]')"
    try:
        import gradio  # noqa: F401
    except ImportError:
        return "gradio is missing (pip install -e '.[web]')"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    proc = subprocess.Popen([sys.executable, "-m", "ultragen.cli", "serve", "--model", "tiny-random", "--port",
                             str(port), "--out", str(tmp_path / "out")], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=tmp_path)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"ultragen serve did not start: {(tmp_path / 'serve.log').read_text()}")
                time.sleep(0.3)
        yield url, tmp_path / "out", tmp_path / "serve.log"
    finally:
        proc.terminate()  # our own child, by its handle
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_generate_see_guide_first_cancel_and_bad_width_in_a_browser(server, tmp_path):
    if (reason := _why_no_browser()) is not None:
        print(f"SKIP browser test: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import expect, sync_playwright

    url, out_dir, log = server
    profile = tmp_path / "chromium-profile"  # a fresh profile every run
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                                       headless=True, viewport={"width": 1280, "height": 1000})
        try:
            page = context.new_page()
            page.goto(url)
            # 1. a 512x768 image, few steps
            page.locator("#ug-prompt textarea").fill("a red fox in the snow")
            page.locator("#ug-width input").fill("512")
            page.locator("#ug-height input").fill("768")
            page.locator("#ug-advanced").get_by_text("Advanced").click()
            _set_slider(page, "ug-steps", 4)
            _set_slider(page, "ug-guide-steps", 4)
            _set_slider(page, "ug-skip", 1)
            page.evaluate(WATCH_IMAGES)
            page.locator("#ug-generate").click()
            expect(page.locator("#ug-status")).to_contain_text("Done", timeout=60_000)
            page.wait_for_function("() => { const i = document.querySelector('#ug-image img');"
                                   " return i && i.complete && i.naturalWidth > 0; }")
            size = page.locator("#ug-image img").evaluate("i => [i.naturalWidth, i.naturalHeight]")
            assert size == [512, 768]
            seen = page.evaluate("() => window.ugSeen")
            assert seen["ug-guide"] < seen["ug-image"], seen
            for stage in ("encode", "guide", "hires", "decode"):
                bar = page.locator(f'#ug-progress [data-stage="{stage}"]')
                assert bar.get_attribute("data-done") == bar.get_attribute("data-total") != "0"
            expect(page.locator("#ug-files")).to_contain_text(".json")
            assert len(list(out_dir.glob("*.png"))) == 1 and len(list(out_dir.glob("*.json"))) == 1
            if os.environ.get("ULTRAGEN_SCREENSHOT"):
                page.evaluate("window.scrollTo(0, 0)")
                page.screenshot(path=os.environ["ULTRAGEN_SCREENSHOT"], full_page=True)
            # 2. a long run, cancelled during the hires steps; the page recovers
            _set_slider(page, "ug-steps", 100)
            _set_slider(page, "ug-skip", 0)
            page.locator("#ug-generate").click()
            page.wait_for_function("() => { const b = document.querySelector('#ug-progress [data-stage=\"hires\"]');"
                                   " return b && b.dataset.total === '100' && b.dataset.done !== '0'; }",
                                   timeout=30_000)
            page.locator("#ug-cancel").click()
            expect(page.locator("#ug-status")).to_contain_text("Cancelled", timeout=30_000)
            hires = page.locator('#ug-progress [data-stage="hires"]')
            assert int(hires.get_attribute("data-done")) < int(hires.get_attribute("data-total")) == 100
            expect(page.locator("#ug-generate")).to_be_enabled()
            expect(page.locator("#ug-cancel")).to_be_disabled()
            assert len(list(out_dir.glob("*.png"))) == 1  # the cancelled image wrote no PNG
            # 3. a bad width: the CLI's message, nothing queued
            page.locator("#ug-width input").fill("1000")
            page.locator("#ug-generate").click()
            expect(page.locator("#ug-status")).to_contain_text(
                "width=1000 px is not a multiple of 16 px", timeout=10_000)
            expect(page.locator("#ug-status")).to_contain_text("use 992 or 1008")
            # 4. fixed: the next image is made (the gallery holds both of this session's images)
            page.locator("#ug-width input").fill("512")
            _set_slider(page, "ug-steps", 4)
            _set_slider(page, "ug-skip", 1)
            page.locator("#ug-generate").click()
            expect(page.locator("#ug-status")).to_contain_text("Done", timeout=60_000)
            expect(page.locator("#ug-gallery img")).to_have_count(2, timeout=10_000)
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"))
            print(f"screenshot: {tmp_path / 'failure.png'}; server log:\n{log.read_text()}")
            raise
        finally:
            context.close()
    assert shutil.which("chromium") or Path(CHROMIUM).exists()


def _set_slider(page, elem_id: str, value: int) -> None:
    """Type into the slider's number box (what a person does for an exact value)."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    box.blur()
