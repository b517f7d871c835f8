"""The web app's first result: seconds from opening the page to the Grad-CAM overlay of the
top-1 class on screen, for a fresh server (the first page pays the model load) and for a
second page on the same server (the model is shared). Drives Debian's Chromium through
Playwright, as tests/test_app_browser.py does.

    python benchmarks/bench_app.py [--pages 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

from cnnscan.app import launch

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
OVERLAY = 'img[alt^="gradcam for"]'


def start_server() -> tuple[subprocess.Popen, str, float]:
    """`cnnscan app` on a free port; (process, url, seconds until it answers)."""
    port = launch.free_port()
    url = f"http://127.0.0.1:{port}"
    began = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "cnnscan.cli", "app", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "NO_SANDBOX_OMP": "1"},
    )
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2):
                return process, url, time.perf_counter() - began
        except OSError:
            if process.poll() is not None or time.perf_counter() - began > 120:
                raise RuntimeError("the app did not start") from None
            time.sleep(0.1)


def first_result(browser, url: str) -> float:
    """Seconds from opening a page to the overlay picture loaded."""
    page = browser.new_context(viewport={"width": 1500, "height": 1100}).new_page()
    began = time.perf_counter()
    page.goto(url)
    page.wait_for_function(
        "sel => [...document.querySelectorAll(sel)].some(e => e.complete && e.naturalWidth)",
        arg=OVERLAY,
        timeout=180_000,
    )
    seconds = time.perf_counter() - began
    page.context.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=3, help="pages opened one after another")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    process, url, started = start_server()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=FLAGS
            )
            times = [first_result(browser, url) for _ in range(args.pages)]
            browser.close()
    finally:
        process.terminate()
        process.wait(30)
    print(f"server answers after {started:.1f} s")
    print(f"first page: Grad-CAM of the top-1 on screen after {times[0]:.1f} s (target ≤ 5 s)")
    for i, seconds in enumerate(times[1:], 2):
        print(f"page {i}: {seconds:.1f} s")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
