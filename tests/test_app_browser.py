"""The web app in a real browser: `cnnscan app`'s server on a free loopback port, driven by
Playwright through Debian's headless Chromium (the `browser` fixture of conftest.py). One
server for the module."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from helpers import header_only_png
from PIL import Image

import cnnscan
from cnnscan import render
from cnnscan.app import launch

pytestmark = pytest.mark.slow

UPLOAD_LIMIT_MB = 1
UPLOADER = "[data-testid='stFileUploader'] input[type='file']"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`cnnscan app` on a free loopback port with a 1 MB upload limit, as a user starts it:
    it prints the URL; the test waits for the health check itself and stops the command
    (SIGTERM) at the end, which must stop the server too."""
    port = launch.free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("app-server") / "server.log"
    command = [sys.executable, "-m", "cnnscan.cli", "app", "--port", str(port)]
    command += ["--max-upload-mb", str(UPLOAD_LIMIT_MB)]
    with log.open("w") as errors:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True)
    try:
        printed = _read_until(process, "cnnscan app: ", timeout=180)
        assert printed.split()[2] == url, printed
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=10) as response:
            assert response.status == 200
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    with pytest.raises(OSError):  # the server went down with the command
        urllib.request.urlopen(f"{url}/_stcore/health", timeout=5)


def _read_until(process: subprocess.Popen, prefix: str, timeout: float) -> str:
    """The first line of the process's output that starts with `prefix`."""
    found: list[str] = []

    def read() -> None:
        for line in process.stdout:
            if line.startswith(prefix):
                found.append(line.strip())
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not found:
        raise AssertionError(
            f"`cnnscan app` printed no URL within {timeout} s (exit {process.poll()})"
        )
    threading.Thread(target=process.stdout.read, daemon=True).start()  # keep the pipe drained
    return found[0]


def open_page(browser, url):
    page = browser.new_context(viewport={"width": 1500, "height": 1100}).new_page()
    page.goto(url)
    return page


def png(image: Image.Image | np.ndarray) -> bytes:
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, "PNG")
    return buffer.getvalue()


def upload(page, name: str, data: bytes, mime: str = "image/png") -> None:
    page.locator(UPLOADER).set_input_files({"name": name, "mimeType": mime, "buffer": data})


def shown_picture(page, url: str, alt: str) -> np.ndarray:
    """The pixels of the picture with this alt text, fetched as the browser fetched them."""
    from playwright.sync_api import expect

    image = page.locator(f'img[alt="{alt}"]')
    expect(image).to_be_visible()
    page.wait_for_function(
        "alt => [...document.images].some(e => e.alt === alt && e.complete && e.naturalWidth)",
        arg=alt,
        timeout=120_000,
    )
    source = image.get_attribute("src")
    body = page.request.get(source if source.startswith("http") else url + source).body()
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


def assert_same_overlay(shown: np.ndarray, reference: np.ndarray) -> None:
    """The app's overlay is the library's: the map's last float bits depend on the batch it
    was computed in, which can move a colour by a level or two on a handful of pixels."""
    difference = np.abs(shown[: reference.shape[0]].astype(int) - reference.astype(int))
    assert difference.max() <= 3 and np.mean(difference > 0) < 1e-3, difference.max()


def gradcam_overlay(model, image, target):
    attr = cnnscan.explain(model, image, "gradcam", targets=[target])
    return render.overlay(model.view(image), attr.view(0, 0, "heatmap"))


def test_sample_gradcam_and_upload(server, browser, default_model, chelsea, cat_top1, tmp_path):
    from playwright.sync_api import expect

    page = open_page(browser, server)
    expect(page.get_by_role("cell", name=cat_top1[1]).first).to_be_visible()
    cat = shown_picture(page, server, f"gradcam for {cat_top1[1]}")
    reference = gradcam_overlay(default_model, chelsea, cat_top1[0])
    assert_same_overlay(cat, reference)
    page.screenshot(path=tmp_path / "first-screen.png", full_page=True)

    coffee = cnnscan.sample_image("coffee")
    upload(page, "coffee.png", png(coffee))
    expect(page.get_by_role("cell", name="espresso").first).to_be_visible()
    cup = shown_picture(page, server, "gradcam for espresso")
    reference = gradcam_overlay(default_model, coffee, 967)
    assert_same_overlay(cup, reference)
    page.screenshot(path=tmp_path / "uploaded.png", full_page=True)
    assert (tmp_path / "uploaded.png").stat().st_size > 10_000
    page.context.close()


def test_two_sessions_at_once(server, browser, default_model, cat_top1):
    from playwright.sync_api import expect

    astronaut, rocket = cnnscan.sample_image("astronaut"), cnnscan.sample_image("rocket")
    tops = [cnnscan.predict(default_model, image)[0][0] for image in (astronaut, rocket)]
    assert tops[0]["label"] != tops[1]["label"]
    pages = [open_page(browser, server), open_page(browser, server)]
    for page in pages:  # both sessions start on the sample
        expect(page.get_by_role("cell", name=cat_top1[1]).first).to_be_visible()
    for page, name, image in zip(
        pages, ("astronaut.png", "rocket.png"), (astronaut, rocket), strict=True
    ):
        upload(page, name, png(image))  # the second upload goes in while the first runs
    for page, image, top in zip(pages, (astronaut, rocket), tops, strict=True):
        alt = f"gradcam for {top['label']}"
        shown = shown_picture(page, server, alt)
        reference = gradcam_overlay(default_model, image, top["class_id"])
        assert_same_overlay(shown, reference)
        page.context.close()


def _truncated() -> bytes:
    data = png(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8))
    return data[: len(data) // 2]


def _bomb() -> bytes:

    return header_only_png(10_000, 10_000)


def test_bad_uploads_show_a_message_and_the_app_keeps_working(server, browser, cat_top1, tmp_path):
    from playwright.sync_api import expect

    page = open_page(browser, server)
    expect(page.get_by_role("cell", name=cat_top1[1]).first).to_be_visible()
    for name, data, message in [
        ("notes.png", b"this is not a picture", "notes.png is not an image"),
        ("cut.png", _truncated(), "damaged or truncated"),
        ("bomb.png", _bomb(), "above the 90 MP limit"),
    ]:
        upload(page, name, data)
        expect(page.get_by_text(message).first).to_be_visible()
        expect(page.get_by_text("The sample photo is shown instead").first).to_be_visible()
        expect(page.get_by_role("cell", name=cat_top1[1]).first).to_be_visible()
    big = png(np.random.default_rng(1).integers(0, 256, (700, 700, 3), dtype=np.uint8))
    assert len(big) > UPLOAD_LIMIT_MB * 2**20
    upload(page, "big.png", big)
    expect(page.get_by_text(f"File must be {UPLOAD_LIMIT_MB:.1f}MB or smaller.")).to_be_visible()
    page.screenshot(path=tmp_path / "bad-upload.png", full_page=True)
    upload(page, "coffee.png", png(cnnscan.sample_image("coffee")))
    expect(page.get_by_role("cell", name="espresso").first).to_be_visible()
    page.context.close()


def test_server_files_are_not_served(server):
    for path in ("/etc/passwd", "/../../etc/passwd", "/app/static/../../../etc/passwd", "/media/x"):
        try:
            with urllib.request.urlopen(server + path, timeout=10) as response:
                body = response.read()
        except urllib.error.HTTPError as e:
            assert e.code in (400, 403, 404)
            continue
        assert b"root:" not in body  # the page's HTML shell, never the file
