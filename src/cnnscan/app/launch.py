"""`cnnscan app`: start the Streamlit server for the page, wait until it answers, print its
URL, and stop it on Ctrl-C."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from cnnscan.app import PAGE
from cnnscan.app.sources import DEFAULT_MAX_UPLOAD_MB, ENV_ALLOW_LOCAL_FILES, ENV_MAX_UPLOAD_MB
from cnnscan.errors import CnnscanError

DEFAULT_PORT = 8501
DEFAULT_HOST = "127.0.0.1"


def free_port(host: str = DEFAULT_HOST) -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def url_of(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


def command(port: int, host: str, max_upload_mb: int) -> list[str]:
    """`python -m streamlit run page.py` headless, without usage statistics or a file
    watcher, with the upload limit enforced by the server too."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(PAGE),
        "--server.headless",
        "true",
        "--server.port",
        str(port),
        "--server.address",
        host,
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
        "--server.maxUploadSize",
        str(max_upload_mb),
        "--client.showErrorDetails",
        "type",
        "--client.toolbarMode",
        "minimal",
    ]


def environment(allow_local_files: bool, max_upload_mb: int) -> dict[str, str]:
    env = dict(os.environ)
    env[ENV_ALLOW_LOCAL_FILES] = "1" if allow_local_files else "0"
    env[ENV_MAX_UPLOAD_MB] = str(max_upload_mb)
    return env


def start(
    port: int = DEFAULT_PORT,
    host: str = DEFAULT_HOST,
    *,
    allow_local_files: bool = False,
    max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB,
    timeout: float = 120.0,
    **popen: object,
) -> tuple[subprocess.Popen, str]:
    """Start the server and wait until `/_stcore/health` answers: (process, URL).
    `port=0` picks a free port."""
    if importlib.util.find_spec("streamlit") is None:
        raise CnnscanError("the web app needs Streamlit: pip install 'cnnscan[app]'")
    if max_upload_mb < 1:
        raise CnnscanError(f"--max-upload-mb must be at least 1, got {max_upload_mb}")
    port = port or free_port(host)
    process = subprocess.Popen(
        command(port, host, max_upload_mb),
        env=environment(allow_local_files, max_upload_mb),
        **popen,  # type: ignore[arg-type]
    )
    url = url_of(host, port)
    try:
        wait_until_healthy(process, url, timeout)
    except BaseException:
        stop(process)
        raise
    return process, url


def wait_until_healthy(process: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CnnscanError(
                f"the app server exited with code {process.returncode} before it answered "
                f"(is port {url.rsplit(':', 1)[-1]} in use? try --port 0)"
            )
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise CnnscanError(f"the app server did not answer at {url} within {timeout:.0f} s")


def stop(process: subprocess.Popen, grace: float = 10.0) -> None:
    """Terminate the server, wait, and kill it if it does not exit."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def serve(
    port: int = DEFAULT_PORT,
    host: str = DEFAULT_HOST,
    *,
    allow_local_files: bool = False,
    max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB,
    announce: Callable[[str], object] = print,
) -> int:
    """Run the app until the server exits or Ctrl-C: the `cnnscan app` command."""
    process, url = start(
        port, host, allow_local_files=allow_local_files, max_upload_mb=max_upload_mb
    )
    announce(f"cnnscan app: {url}  (Ctrl-C stops it)")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_signal)  # so that `finally` stops the server
    try:
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop(process)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)
