"""Synthesis in the background: activation maximization, class images, DeepDream and
inversion run in a worker thread that reports each step and stops when asked, so the page
stays responsive and shows progress while an image takes shape."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cnnscan
from cnnscan.app.core import ResultCache
from cnnscan.app.sources import SourceImage
from cnnscan.errors import CnnscanError
from cnnscan.models import Model
from cnnscan.synthesis import Synthesis, channel, neuron

KINDS = ("class image", "channel", "neuron", "deepdream", "inversion")


@dataclass(frozen=True)
class SynthesisRequest:
    """What to synthesize. `layer`/`unit` for channel, neuron, DeepDream and inversion;
    `class_id` for class images; `octaves` for DeepDream; `size` for noise-started images."""

    kind: str
    steps: int = 64
    seed: int = 0
    class_id: int = 0
    layer: str = ""
    unit: int = 0
    octaves: int = 3
    size: int = 224

    @property
    def total_steps(self) -> int:
        return self.steps * (self.octaves if self.kind == "deepdream" else 1)

    @property
    def title(self) -> str:
        if self.kind == "class image":
            return f"class image of {self.class_id}"
        if self.kind in ("channel", "neuron"):
            return f"{self.kind} {self.unit} of {self.layer}"
        return f"{self.kind} at {self.layer}"


def run_request(
    model: Model,
    picture: SourceImage,
    request: SynthesisRequest,
    callback: Callable[[int, float], object] | None = None,
) -> Synthesis:
    """Call the library function for `request` (DeepDream and inversion use `picture`)."""
    common: dict[str, Any] = {"seed": request.seed, "progress": False, "callback": callback}
    if request.kind == "class image":
        return cnnscan.class_image(
            model, request.class_id, steps=request.steps, size=request.size, **common
        )
    if request.kind in ("channel", "neuron"):
        objective = (channel if request.kind == "channel" else neuron)(request.layer, request.unit)
        return cnnscan.synthesize(
            model, objective, steps=request.steps, size=request.size, **common
        )
    if request.kind == "deepdream":
        return cnnscan.deepdream(
            model,
            picture.image,
            request.layer,
            octaves=request.octaves,
            steps=request.steps,
            **common,
        )
    if request.kind == "inversion":
        return cnnscan.invert(model, picture.image, request.layer, steps=request.steps, **common)
    raise CnnscanError(f"unknown synthesis {request.kind!r}; choose one of {', '.join(KINDS)}")


class Cancelled(Exception):
    """Raised inside the synthesis loop when the user pressed Stop."""


class Job:
    """One synthesis run in a daemon thread: `state` is "running", "done", "stopped" or
    "failed"; `step`/`total` say how far it got, `result` or `error` how it ended. A
    finished result is kept in `cache` under `key`, so the same request is instant."""

    def __init__(
        self,
        model: Model,
        picture: SourceImage,
        request: SynthesisRequest,
        cache: ResultCache,
        key: tuple,
    ):
        self.request = request
        self.total = request.total_steps
        self.step = 0
        self.value: float | None = None
        self.result: Synthesis | None = cache.get(key)
        self.error = ""
        self.state = "done" if self.result is not None else "running"
        self._stop = threading.Event()
        self._args = (model, picture, request, cache, key)
        self._thread: threading.Thread | None = None
        if self.state == "running":
            self._thread = threading.Thread(target=self._run, daemon=True, name="cnnscan-synth")
            self._thread.start()

    def _progress(self, step: int, value: float) -> None:
        self.step, self.value = step, value
        if self._stop.is_set():
            raise Cancelled

    def _run(self) -> None:
        model, picture, request, cache, key = self._args
        try:
            result = run_request(model, picture, request, self._progress)
        except Cancelled:
            self.state = "stopped"
        except CnnscanError as e:
            self.error, self.state = str(e), "failed"
        except Exception as e:  # shown in the page; the app keeps running
            self.error, self.state = f"{type(e).__name__}: {e}", "failed"
        else:
            cache.put(key, result)
            self.result, self.step, self.state = result, self.total, "done"

    def stop(self) -> None:
        """Ask the run to stop after the current step."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> str:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.state

    @property
    def running(self) -> bool:
        return self.state == "running"


def request_key(model_key: str, picture: SourceImage, request: SynthesisRequest) -> tuple:
    """The cache key of a request: the picture counts only for DeepDream and inversion."""
    uses_picture = request.kind in ("deepdream", "inversion")
    return ("synthesis", model_key, picture.digest if uses_picture else "", request)
