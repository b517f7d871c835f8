"""`explorer()`: an ipywidgets explorer for Jupyter, like the classic keras visualization
notebooks: pick a model, an image (a sample or an upload), a method, a layer and a target,
and see the overlay, the raw map and the top-5 table update in place.

A thin shell over the library (`load_model`, `load_image`, `explain`): no method logic here.
Needs `pip install 'cnnscan[notebook]'` (ipywidgets).
"""

from __future__ import annotations

import html
import time
from typing import Any

import numpy as np

from cnnscan import render
from cnnscan.api import explain
from cnnscan.display import Predictions, background
from cnnscan.images import load_image, sample_names
from cnnscan.methods import list_methods
from cnnscan.models import DEFAULT_MODEL, Model, load_model
from cnnscan.scan import make_scan

try:
    import ipywidgets as widgets
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("cnnscan.widgets needs ipywidgets: pip install 'cnnscan[notebook]'") from e

GIVEN = "(given)"  # the option of a model or image passed to `explorer()`
DEFAULT_LAYER = "(default)"
PANEL_PX = 224
TOP_K = 5


def _png(rgb: np.ndarray) -> bytes:
    return render.png_bytes(render.enlarge(rgb[None], PANEL_PX)[0])


def _layer_options(scan: Any) -> list[str]:
    """Layers with spatial outputs (those a layer method can explain), in execution order."""
    rows = scan.layer_table()
    spatial = [
        row.name
        for row in rows
        if row.output_shape is not None
        and len(row.output_shape) == 3
        and row.output_shape[1] * row.output_shape[2] > 1
    ]
    return [DEFAULT_LAYER, *dict.fromkeys(spatial)]


class Explorer(widgets.VBox):
    """The explorer's widgets and what they show; see `explorer()`.

    Controls: `model`, `weights`, `image`, `upload`, `method`, `layer`, `target`.
    Outputs: `overlay` and `raw` (PNG images), `table` (top-5, HTML), `status` (HTML).
    `attribution` is the last explanation shown.
    """

    def __init__(self, model: Any = None, image: Any = None) -> None:
        self._given_model = load_model(model) if model is not None else None
        self._given_image = load_image(image) if image is not None else None
        self._uploads: dict[str, bytes] = {}
        self._quiet = False  # True while options are being refilled: no recomputation
        self.loaded: Model | None = None
        self.picture = None
        self._shown_image = None  # the image option whose picture is shown
        self.scan = None
        self.attribution = None

        models = [DEFAULT_MODEL, *(n for n in _model_names() if n != DEFAULT_MODEL)]
        if self._given_model is not None:
            models.insert(0, GIVEN)
        self.model = widgets.Dropdown(options=models, value=models[0], description="model")
        self.weights = widgets.Dropdown(
            options=[("ImageNet", "imagenet"), ("random init", "none")],
            value="imagenet",
            description="weights",
        )
        images = [(name, f"sample:{name}") for name in sample_names()]
        if self._given_image is not None:
            images.insert(0, (GIVEN, GIVEN))
        start = GIVEN if self._given_image is not None else "sample:chelsea"
        self.image = widgets.Dropdown(options=images, value=start, description="image")
        self.upload = widgets.FileUpload(accept="image/*", multiple=False, description="upload")
        self.method = widgets.Dropdown(options=_method_options(), description="method")
        names = [value for _, value in self.method.options]
        self.method.value = "gradcam" if "gradcam" in names else names[0]
        self.layer = widgets.Dropdown(options=[DEFAULT_LAYER], description="layer")
        self.target = widgets.Dropdown(options=[], description="target")
        self.overlay = widgets.Image(format="png", width=PANEL_PX)
        self.raw = widgets.Image(format="png", width=PANEL_PX)
        self.table = widgets.HTML()
        self.status = widgets.HTML()

        def titled(title: str, child: widgets.Widget) -> widgets.VBox:
            return widgets.VBox([widgets.HTML(f"<b>{title}</b>"), child])

        super().__init__(
            [
                widgets.HBox([self.model, self.weights]),
                widgets.HBox([self.image, self.upload]),
                widgets.HBox([self.method, self.layer, self.target]),
                widgets.HBox(
                    [
                        titled("overlay", self.overlay),
                        titled("raw signed map (native resolution)", self.raw),
                        titled(f"top {TOP_K}", self.table),
                    ]
                ),
                self.status,
            ]
        )
        self.model.observe(self._on_model, "value")
        self.weights.observe(self._on_model, "value")
        self.image.observe(self._on_image, "value")
        self.upload.observe(self._on_upload, "value")
        for control in (self.method, self.layer, self.target):
            control.observe(self._on_choice, "value")
        self._guard(self._load_model)

    # -- callbacks: each runs the library and reports errors in `status` ----------------------
    def _guard(self, step: Any) -> bool:
        """Run a step; on any error show it in `status` and return False."""
        try:
            step()
        except Exception as e:  # the UI reports every failure instead of raising
            message = " ".join(str(e).split()) or type(e).__name__
            self.status.value = f'<span style="color:#b00">error: {html.escape(message)}</span>'
            return False
        return True

    def _revert(self, control: widgets.Dropdown, value: Any) -> None:
        """Put a control back to its last working value (its failure stays in `status`)."""
        self._quiet = True
        try:
            control.value = value
        finally:
            self._quiet = False

    def _on_model(self, change: dict) -> None:
        if not self._quiet and not self._guard(self._load_model):
            self._revert(change["owner"], change["old"])

    def _on_image(self, change: dict) -> None:
        if not self._quiet and not self._guard(self._load_image):
            self._revert(self.image, change["old"])

    def _on_choice(self, change: dict) -> None:
        if not self._quiet:
            self._guard(self._explain)

    def _on_upload(self, change: dict) -> None:
        for item in change["new"]:
            name = item["name"]
            key = f"upload:{name}"
            self._uploads[name] = bytes(item["content"])
            if key not in [value for _, value in self.image.options]:
                self._quiet = True
                self.image.options = [*self.image.options, (f"upload: {name}", key)]
                self.image.value = self._shown_image
                self._quiet = False
            if self.image.value == key:  # the same name again: new content
                self._guard(self._load_image)
            else:
                self.image.value = key
            if self.image.value != key:  # it could not be read: forget it
                del self._uploads[name]
                self._quiet = True
                self.image.options = [o for o in self.image.options if o[1] != key]
                self.image.value = self._shown_image
                self._quiet = False

    # -- the steps -----------------------------------------------------------------------------
    def _load_model(self) -> None:
        if self.model.value == GIVEN:
            model = self._given_model
        else:
            weights = None if self.weights.value == "none" else self.weights.value
            model = load_model(self.model.value, weights=weights)
        self._load_image(model)

    def _load_image(self, model: Model | None = None) -> None:
        """A new scan of the chosen image (with `model` if given, which then becomes the
        explorer's model once the scan worked), then the explanation."""
        model = model or self.loaded
        key = self.image.value
        if key == GIVEN:
            picture = self._given_image
        elif key.startswith("upload:"):
            picture = load_image(self._uploads[key.removeprefix("upload:")])
        else:
            picture = load_image(key)
        self.scan = make_scan(model, model.preprocessing(picture), list_methods())
        self.loaded, self.picture, self._shown_image = model, picture, key
        top = self.scan.predictions(min(TOP_K, self.scan.logits.shape[1]))
        self.table.value = Predictions(top)._repr_html_()
        ranked = [
            (f"{p['rank']}. {p['class_id']} {p['label']} ({p['probability']:.3f})", p["class_id"])
            for p in top[0]
        ]
        labels = model.labels
        every = [(f"{i} {labels[i]}", i) for i in range(len(labels))]
        self._quiet = True
        try:
            self.layer.options = _layer_options(self.scan)
            self.layer.value = DEFAULT_LAYER
            self.target.options = [*ranked, *every]
            self.target.index = 0
        finally:
            self._quiet = False
        self._explain()

    def _explain(self) -> None:
        from cnnscan.methods import get_method

        info = get_method(self.method.value)
        takes_layer = "layer" in info.options()
        self.layer.disabled = not takes_layer
        layer = self.layer.value if takes_layer and self.layer.value != DEFAULT_LAYER else None
        began = time.perf_counter()
        attr = explain(
            self.loaded, self.picture, info.name, [self.target.value], layer=layer, scan=self.scan
        )
        seconds = time.perf_counter() - began
        self.attribution = attr
        back = background(attr, 0)
        self.overlay.value = _png(attr.image(0, 0, "heatmap", background=back))
        self.raw.value = _png(
            render.to_rgb(render.view(attr.maps[0, 0], "signed"), render.DIVERGING)
        )
        where = f" at <code>{html.escape(attr.layer)}</code>" if attr.layer else ""
        paper = f" — {html.escape(info.paper)}" if info.paper else ""
        self.status.value = (
            f"<b>{info.name}</b>{where} for {html.escape(attr.label(0, 0))}: "
            f"{seconds:.2f} s. {html.escape(info.description)}{paper}"
        )


def _model_names() -> list[str]:
    from cnnscan.models.zoo import list_models

    return list_models()


def _method_options() -> list[tuple[str, str]]:
    """Every registered method, grouped by family (registry order): ("family: name", name);
    methods left out of the default scan (many forwards) are labelled slow."""
    return [
        (f"{info.family}: {info.name}{'' if info.in_default_scan else ' (slow)'}", info.name)
        for info in list_methods()
    ]


def explorer(model: Any = None, image: Any = None) -> Explorer:
    """An interactive explorer widget: `model` (default: the bundled EfficientNet-Lite0, or
    any model `load_model` accepts) and `image` (default: the cat sample) start it; every
    control can change them. Display it as the last expression of a notebook cell."""
    return Explorer(model, image)
