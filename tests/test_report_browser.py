"""The default report of the cat photo in a real browser (Debian's Chromium through
Playwright, the `browser` fixture of conftest.py) at 1,400×900: no horizontal scrolling
whichever class and view is chosen, no flat picture (the luminance of every embedded
picture of 32 px or more varies by at least 12 of 255, measured on the decoded pixels in
the page), the class image at least 224 px wide, and the output small enough to send."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

WIDTH, HEIGHT = 1400, 900
MIN_LUMINANCE_STD = 12  # of 255
MAX_REPORT_BYTES = 3_000_000
MAX_OUTPUT_BYTES = 10_000_000

# Every <img> decoded and drawn on a canvas at its own size; luminance as PIL's "L" mode.
CONTRAST = """async () => {
  const found = [];
  for (const img of document.images) {
    await img.decode();
    const w = img.naturalWidth, h = img.naturalHeight;
    if (w < 32 || h < 32) continue;
    const canvas = document.createElement("canvas");
    canvas.width = w; canvas.height = h;
    const context = canvas.getContext("2d");
    context.drawImage(img, 0, 0);
    const data = context.getImageData(0, 0, w, h).data;
    let sum = 0, squares = 0;
    for (let i = 0; i < data.length; i += 4) {
      const y = (299 * data[i] + 587 * data[i + 1] + 114 * data[i + 2]) / 1000;
      sum += y; squares += y * y;
    }
    const mean = sum / (w * h), variance = squares / (w * h) - mean * mean;
    found.push({alt: img.alt, size: [w, h], std: Math.sqrt(Math.max(0, variance))});
  }
  return found;
}"""
SCROLL_WIDTH = "document.documentElement.scrollWidth"


def test_default_report_fits_the_screen_and_no_picture_is_flat(default_report, browser, tmp_path):
    code, out, _, stderr = default_report
    assert code == 0, stderr
    report = out / "report.html"
    assert report.stat().st_size <= MAX_REPORT_BYTES
    assert sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) <= MAX_OUTPUT_BYTES
    page = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT}).new_page()
    page.goto(report.as_uri())
    assert page.evaluate(SCROLL_WIDTH) <= WIDTH
    pictures = page.evaluate(CONTRAST)
    assert len(pictures) > 5 * 16 * 2  # every method alone and over the photo, five classes
    flat = [p for p in pictures if p["std"] < MIN_LUMINANCE_STD]
    assert not flat, flat
    picture = page.get_by_alt_text("synthesized image of the top-1 class").bounding_box()
    assert picture["width"] >= 224 and picture["height"] >= 224
    page.screenshot(path=tmp_path / "first-screen.png")
    for label in page.locator(".controls label").all():  # every class, every view
        label.click()
        assert page.evaluate(SCROLL_WIDTH) <= WIDTH, label.inner_text()
        shown = page.locator(".panel:visible .cell img:visible")
        assert shown.count() >= 16, label.inner_text()
    page.context.close()
