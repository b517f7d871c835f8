"""The inference engine for forwards without gradients: ONNX Runtime gives torch's logits
within float32 rounding, the exported graph is cached on disk, and torch does the work
whenever ONNX Runtime cannot (missing, turned off, a model that does not export, a damaged
cache file, another dtype), with the same numbers."""

from __future__ import annotations

import sys

import pytest
import torch
import torchvision
from helpers import SafetyNet, SmallConvNet, assert_unchanged, snapshot
from torch import nn

import cnnscan
from cnnscan.engine import inference
from cnnscan.scan import make_scan

onnxruntime = pytest.importorskip("onnxruntime")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test exports into its own cache and builds its engines afresh."""
    monkeypatch.setenv(inference.CACHE_VARIABLE, str(tmp_path / "cache"))
    monkeypatch.delenv(inference.ENGINE_VARIABLE, raising=False)
    inference._engines.clear()
    yield
    inference._engines.clear()


def perturbed(scan, count: int = 6) -> torch.Tensor:
    noise = torch.randn((count, *scan.inputs.shape[1:]), generator=torch.Generator().manual_seed(0))
    return scan.inputs + 0.3 * noise


def torch_logits(model: cnnscan.Model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.module.eval()(x)


def engine_name(scan) -> str:
    with scan.inference_engine(tuple(scan.inputs.shape[1:])) as (name, _):
        return name


@pytest.mark.parametrize("build", ["small", "safety", "resnet18", "vgg11"])
def test_onnxruntime_gives_torch_logits(build):
    module = {
        "small": lambda: SmallConvNet(),
        "safety": lambda: SafetyNet(),
        "resnet18": lambda: torchvision.models.resnet18(weights=None),
        "vgg11": lambda: torchvision.models.vgg11(weights=None),
    }[build]().eval()
    size = {"small": (16, 16), "safety": (16, 16), "resnet18": (64, 64), "vgg11": (224, 224)}[build]
    model = cnnscan.load_model(module, preprocessing=cnnscan.Preprocessing(size=size))
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    scan = make_scan(model, x)
    before = snapshot(module)
    assert engine_name(scan) == "onnxruntime"
    points = perturbed(scan, 2 if build == "vgg11" else 6)
    got = scan.logits_at(points)
    expected = torch_logits(model, points)
    scale = float(expected.abs().max())
    assert torch.allclose(got, expected, rtol=0, atol=1e-4 * max(scale, 1.0))
    assert_unchanged(before, module)


def test_the_default_model_through_onnxruntime(default_model):
    scan = make_scan(default_model, "sample:chelsea")
    assert engine_name(scan) == "onnxruntime"
    points = perturbed(scan, 4)
    got = scan.logits_at(points)
    expected = torch_logits(default_model, points)
    assert float((got - expected).abs().max()) < 1e-4 * float(expected.abs().max())
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_a_second_engine_reads_the_cache_without_exporting(monkeypatch):
    model = cnnscan.load_model(SmallConvNet())
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    first = make_scan(model, x).logits_at(x + 1)
    files = list(inference.cache_dir().glob("onnx/*.onnx"))
    assert len(files) == 1
    inference._engines.clear()  # a new process: nothing in memory, the file on disk

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(inference, "export", no_export)
    scan = make_scan(model, x)
    assert engine_name(scan) == "onnxruntime"
    assert torch.equal(scan.logits_at(x + 1), first)


def test_other_weights_get_their_own_graph():
    module = SmallConvNet()
    key = inference.model_key(module, (3, 16, 16))
    with torch.no_grad():
        module.fc.weight[0, 0] += 1
    assert inference.model_key(module, (3, 16, 16)) != key
    assert inference.model_key(module, (3, 32, 32)) != inference.model_key(module, (3, 16, 16))


def test_a_damaged_cache_file_is_exported_again():
    model = cnnscan.load_model(SmallConvNet())
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    expected = make_scan(model, x).logits_at(x * 2)
    (path,) = inference.cache_dir().glob("onnx/*.onnx")
    path.write_bytes(b"not an onnx graph")
    inference._engines.clear()
    scan = make_scan(model, x)
    assert engine_name(scan) == "onnxruntime"
    assert torch.equal(scan.logits_at(x * 2), expected)
    assert path.stat().st_size > 100


class DataDependent(SmallConvNet):
    """Takes a branch by the input's values: a traced graph would keep the branch the
    export input took, so the model is never exported."""

    def forward(self, x):
        out = super().forward(x)
        return out * 2 if bool(x.mean() > 0) else out - 1


@pytest.mark.parametrize(
    "case", ["missing", "turned_off", "not_exportable", "float64", "borrowed", "data_dependent"]
)
def test_torch_does_the_work_when_onnxruntime_cannot(case, monkeypatch):
    module: nn.Module = SmallConvNet()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    if case == "missing":
        monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    elif case == "turned_off":
        monkeypatch.setenv(inference.ENGINE_VARIABLE, "torch")
    elif case == "not_exportable":

        def broken(*args, **kwargs):
            raise RuntimeError("unsupported operator")

        monkeypatch.setattr(inference, "export", broken)
    elif case == "float64":
        module, x = module.double(), x.double()
    elif case == "borrowed":
        import threading

        module.lock = threading.Lock()  # cannot be deep-copied: cnnscan borrows it
    elif case == "data_dependent":
        module, x = DataDependent(), x.abs() + 0.1  # the check input takes the first branch
    model = cnnscan.load_model(module)
    scan = make_scan(model, x)
    assert engine_name(scan) == "torch"
    points = -x.abs() - 0.1 if case == "data_dependent" else x + 0.5
    expected = torch_logits(model, points)
    assert torch.allclose(scan.logits_at(points), expected, atol=1e-6)


def test_the_scan_prepares_the_engine_in_the_background():
    model = cnnscan.load_model(SmallConvNet())
    scan = make_scan(model, torch.randn(1, 3, 16, 16))
    scan.prepare_inference().join()
    assert engine_name(scan) == "onnxruntime"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["scorecam", "occlusion", "rise", "lime", "kernel_shap"])
def test_perturbation_maps_match_torch_eager(default_model, method, monkeypatch):
    """Every method that perturbs the input gives the same maps through ONNX Runtime as
    through torch, within float32 rounding."""
    options = {
        "scorecam": {},
        "occlusion": {"window": 32, "stride": 32, "incremental": False},
        "rise": {"n_masks": 64},
        "lime": {"n_samples": 64},
        "kernel_shap": {"n_samples": 64},
    }[method]
    image = "sample:chelsea"
    fast = cnnscan.explain(default_model, image, method, targets="top2", **options)
    monkeypatch.setenv(inference.ENGINE_VARIABLE, "torch")
    inference._engines.clear()
    plain = cnnscan.explain(default_model, image, method, targets="top2", **options)
    scale = float(plain.maps.abs().max())
    assert torch.allclose(fast.maps, plain.maps, rtol=0, atol=2e-4 * scale), method


@pytest.mark.parametrize("build", ["default", "resnet18"])
@pytest.mark.parametrize("engine", ["onnxruntime", "torch"])
def test_a_graph_free_scan_gives_the_layer_maps_of_a_full_scan(build, engine, monkeypatch):
    """Layer outputs from ONNX Runtime (or torch without a graph) and gradients through the
    part after the layer give the CAMs of a scan with the whole graph; exporting leaves the
    working copy as it was (an export once put it in training mode)."""
    if engine == "torch":
        monkeypatch.setenv(inference.ENGINE_VARIABLE, "torch")
    if build == "default":
        model = cnnscan.load_model()
    else:
        size = cnnscan.Preprocessing(size=(64, 64))
        model = cnnscan.load_model(torchvision.models.resnet18(weights=None), preprocessing=size)
    x = torch.cat([model.preprocess("sample:chelsea"), model.preprocess("sample:coffee")])
    full = make_scan(model, x)
    layer = full.default_layer()
    free = cnnscan.Scan(model, x, layers=[layer], relu_rules=False, graph=False)
    assert free._x is None
    assert torch.allclose(free.logits, full.logits.detach(), atol=1e-4)
    targets = full.targets("top2")
    assert torch.allclose(
        free.layer_gradients(layer, targets), full.layer_gradients(layer, targets), atol=1e-6
    )
    for method in ("gradcam", "gradcam_pp", "layercam", "hirescam", "eigencam"):
        ours = cnnscan.explain(model, x, method, targets="top2", scan=free).maps
        theirs = cnnscan.explain(model, x, method, targets="top2", scan=full).maps
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max())), (
            method
        )
    assert free._x is None  # no method needed the graph
    again = make_scan(model, x)  # the working copy still computes the model
    assert torch.allclose(again.logits.detach(), full.logits.detach(), atol=1e-5)
    assert torch.equal(
        cnnscan.explain(model, x, "gradient", scan=free).maps,
        cnnscan.explain(model, x, "gradient", scan=full).maps,
    )  # a method that needs the graph runs the forward then


GRAPH_FREE = [
    info.name
    for info in cnnscan.list_methods()
    if info.space == "layer" and not info.relu_rules and not info.needs_graph
]


@pytest.fixture(scope="module")
def small_resnet():
    torch.manual_seed(0)
    size = cnnscan.Preprocessing(size=(64, 64))
    model = cnnscan.load_model(torchvision.models.resnet18(weights=None), preprocessing=size)
    x = torch.cat([model.preprocess("sample:chelsea"), model.preprocess("sample:coffee")])
    return model, x


@pytest.mark.parametrize("method", GRAPH_FREE)
def test_every_layer_map_not_marked_needs_graph_runs_graph_free(method, small_resnet):
    """Batch runs these without an autograd graph (`MethodInfo.needs_graph` is False): each
    gives the map of a full scan, and never asks for the graph."""
    model, x = small_resnet
    full = make_scan(model, x)
    free = cnnscan.Scan(model, x, layers=[full.default_layer()], relu_rules=False, graph=False)
    ours = cnnscan.explain(model, x, method, targets="top2", scan=free).maps
    theirs = cnnscan.explain(model, x, method, targets="top2", scan=full).maps
    scale = float(theirs.abs().max())
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4 * scale), method
    assert free._x is None


def test_a_batch_of_a_method_that_differentiates_the_logits_keeps_the_graph(small_resnet):
    from cnnscan.batch.compute import Explainer, Settings

    model, _ = small_resnet
    assert Explainer(model, Settings(methods=("finercam",))).graph
    assert not Explainer(model, Settings(methods=("gradcam",))).graph
