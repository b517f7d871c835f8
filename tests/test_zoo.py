"""Models by name: torchvision and timm names, preprocessing and labels from each library's
own metadata (checked against the library's own transforms), the Keras-applications names,
weight files, and a fast, helpful failure when ImageNet weights cannot be had offline."""

from __future__ import annotations

import itertools
import re
import socket
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import cnnscan
from cnnscan import ModelError, load_model
from cnnscan.models import zoo

timm = pytest.importorskip("timm")

DOCS = Path(__file__).parents[1] / "docs" / "models.md"


@pytest.fixture(scope="module")
def picture():
    """An odd-sized, non-square picture, so resize and crop arithmetic both matter."""
    pixels = np.random.default_rng(0).integers(0, 256, (301, 257, 3), dtype=np.uint8)
    return cnnscan.load_image(pixels)


# -- names ----------------------------------------------------------------------------------------
def test_list_models_pattern():
    names = cnnscan.list_models("*vgg*")
    assert {"vgg16", "vgg19_bn", "VGG16", "VGG19", "repvgg_a0", "timm:vgg16"} <= set(names)
    assert all("vgg" in name.lower() for name in names)
    assert cnnscan.list_models("EfficientNet_LITE0") == ["efficientnet_lite0"]
    assert cnnscan.list_models("no-such-thing*") == []


def test_every_torchvision_and_timm_name_is_listed():
    listed = set(cnnscan.list_models())
    torchvision_names = torchvision.models.list_models(module=torchvision.models)
    assert set(torchvision_names) <= listed
    for name in timm.list_models():
        assert name in listed or f"timm:{name}" in listed, name
    assert set(zoo.KERAS_APPLICATIONS) <= listed


def test_torchvision_wins_a_shared_name_and_timm_prefix_picks_timm():
    assert isinstance(load_model("resnet18", weights=None).module, torchvision.models.ResNet)
    assert isinstance(load_model("timm:resnet18", weights=None).module, timm.models.ResNet)
    assert isinstance(
        load_model("torchvision:resnet18", weights=None).module, torchvision.models.ResNet
    )


def test_timm_only_names_and_pretrained_tags_load():
    model = load_model("convnext_atto", weights=None)
    assert type(model.module).__module__.startswith("timm.")
    tagged = load_model("resnet18.a1_in1k", weights=None)
    assert tagged.module.pretrained_cfg["tag"] == "a1_in1k"


def test_unknown_name_suggests_timm_and_keras_names_too():
    with pytest.raises(ModelError, match="InceptionResNetV2"):
        load_model("InceptionResnetV3", weights=None)
    with pytest.raises(ModelError, match="convnext_atto"):
        load_model("convnext_ato", weights=None)


def _suggested(name: str) -> list[str]:
    with pytest.raises(ModelError) as info:
        load_model(name, weights=None)
    return str(info.value).split("Did you mean: ")[1].split("?")[0].split(", ")


@pytest.mark.parametrize(
    ("typed", "expected"),
    [("vgg1", "vgg19"), ("ResNet5O", "ResNet50"), ("resnet5", "resnet50"), ("densenet12", None)],
)
def test_suggestions_name_each_architecture_once_in_the_typed_style(typed, expected):
    # torchvision's vgg16, Keras' VGG16 and timm:vgg16 are one architecture: named once
    suggested = _suggested(typed)
    assert 1 <= len(suggested) <= 5
    loaded = [zoo.keras_equivalent(s) if s in zoo.KERAS_APPLICATIONS else s for s in suggested]
    bare = [s.lower().removeprefix("timm:") for s in loaded]
    assert len(set(bare)) == len(bare), suggested
    if expected:
        assert suggested[0] == expected


# -- preprocessing from the libraries' own metadata ------------------------------------------------
@pytest.mark.parametrize("name", ["swin_t", "efficientnet_v2_s", "regnet_y_400mf"])
def test_torchvision_preprocessing_equals_its_weights_transforms(name, picture):
    model = load_model(name, weights=None)
    reference = torchvision.models.get_model_weights(name).DEFAULT.transforms()(picture)
    torch.testing.assert_close(model.preprocess(picture), reference.unsqueeze(0), rtol=0, atol=1e-6)


def _torchvision_weights() -> list:
    """Every weights entry of every torchvision classifier (reading `.transforms()` and
    `.meta` downloads nothing)."""
    names = torchvision.models.list_models(module=torchvision.models)
    return [w for name in names for w in torchvision.models.get_model_weights(name)]


@pytest.mark.slow
def test_every_torchvision_weights_transform_is_followed(picture):
    entries = _torchvision_weights()
    assert len(entries) > 100
    for weights in entries:
        transform = weights.transforms()
        ours = zoo.torchvision_preprocessing(weights)
        assert ours.resize_shorter == transform.resize_size[0], weights
        assert ours.interpolation == transform.interpolation.value, weights
        assert (ours.mean, ours.std) == (tuple(transform.mean), tuple(transform.std)), weights
        reference = transform(picture).unsqueeze(0)
        torch.testing.assert_close(ours(picture), reference, rtol=0, atol=1e-6, msg=str(weights))


# Keras names whose equivalent carries weights ported from Keras/TensorFlow, with the Keras
# preprocessing those weights were trained with (EfficientNet's Keras models normalize
# inside the model with ImageNet's statistics: mode "torch").
KERAS_PORTS = {
    "Xception": ("xception", None),
    "InceptionResNetV2": ("inception_resnet_v2", None),
    "NASNetLarge": ("nasnet", None),
    **{f"EfficientNetB{i}": ("imagenet_utils", "torch") for i in range(8)},
}


@pytest.mark.slow
def test_keras_ports_normalize_as_keras_preprocess_input(monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    pixels = np.array([0.0, 31.0, 127.5, 200.0, 255.0])
    grid = np.array(list(itertools.product(pixels, repeat=3))).reshape(1, -1, 1, 3)
    for name, (module, mode) in KERAS_PORTS.items():
        equivalent = zoo.keras_equivalent(name)
        assert equivalent.startswith("timm:"), name
        config = timm.data.resolve_data_config(
            pretrained_cfg=timm.models.get_pretrained_cfg(equivalent[5:]).to_dict()
        )
        ours = zoo.timm_preprocessing(config)
        preprocess = getattr(keras.applications, module).preprocess_input
        keras_input = preprocess(grid.copy(), **({"mode": mode} if mode else {}))
        tensor = torch.from_numpy(grid / 255).permute(0, 3, 1, 2)
        np.testing.assert_allclose(
            ours.normalize(tensor).permute(0, 2, 3, 1).numpy(), keras_input, atol=1e-5, err_msg=name
        )


def _distinct_timm_configs() -> list[str]:
    """For each distinct eval transform (crop fraction and mode, interpolation, statistics,
    square or not), the pretrained tag with the smallest input."""
    chosen: dict[tuple, tuple[int, str]] = {}
    for name in timm.list_models(pretrained=True):
        config = timm.models.get_pretrained_cfg(name)
        if config.crop_mode == "border":  # approximated (documented): not compared
            continue
        _, height, width = config.input_size
        key = (
            config.crop_pct,
            config.crop_mode,
            config.interpolation,
            config.mean,
            config.std,
            height == width,
        )
        if key not in chosen or height * width < chosen[key][0]:
            chosen[key] = (height * width, name)
    return sorted(name for _, name in chosen.values())


@pytest.mark.slow
def test_timm_preprocessing_equals_timm_transforms_for_every_distinct_config(picture):
    names = _distinct_timm_configs()
    assert len(names) > 50
    modes = set()
    for name in names:
        config = timm.data.resolve_data_config(
            pretrained_cfg=timm.models.get_pretrained_cfg(name).to_dict()
        )
        modes.add(config["crop_mode"])
        reference = timm.data.create_transform(**config)(picture).unsqueeze(0)
        ours = zoo.timm_preprocessing(config)(picture)
        assert ours.shape == reference.shape, name
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6, msg=name)
    assert {"center", "squash"} <= modes


@pytest.mark.parametrize("name", ["inception_resnet_v2", "tf_efficientnetv2_b3.in21k_ft_in1k"])
def test_load_model_uses_the_models_own_timm_config(name, picture):
    model = load_model(f"timm:{name}", weights=None)
    config = timm.data.resolve_model_data_config(model.module)
    reference = timm.data.create_transform(**config)(picture).unsqueeze(0)
    torch.testing.assert_close(model.preprocess(picture), reference, rtol=0, atol=1e-6)


def test_timm_labels_come_from_the_weights_imagenet_subset():
    model = load_model("timm:resnet18", weights=None)
    info = timm.data.ImageNetInfo("imagenet-1k")
    assert model.labels[285] == "Egyptian cat" == info.index_to_description(285).split(",")[0]
    assert len(model.labels) == 1000
    wide = load_model("timm:vit_tiny_patch16_224.augreg_in21k", weights=None)
    subset = timm.data.infer_imagenet_subset(wide.module)
    assert subset.startswith("imagenet-21k")
    names = timm.data.ImageNetInfo(subset).label_descriptions()
    assert wide.num_classes == len(wide.labels) == len(names) > 20000
    assert wide.labels[:3] == tuple(n.split(",")[0] for n in names[:3])


# -- Keras-applications names ----------------------------------------------------------------------
KERAS_NAMES = (
    "Xception VGG16 VGG19 ResNet50 ResNet101 ResNet152 ResNet50V2 ResNet101V2 ResNet152V2 "
    "InceptionV3 InceptionResNetV2 MobileNet MobileNetV2 MobileNetV3Small MobileNetV3Large "
    "DenseNet121 DenseNet169 DenseNet201 NASNetMobile NASNetLarge "
    + " ".join(f"EfficientNetB{i}" for i in range(8))
).split()


def test_every_keras_applications_name_has_an_entry():
    assert set(zoo.KERAS_APPLICATIONS) == set(KERAS_NAMES)
    known = set(cnnscan.list_models())
    for name in zoo.KERAS_APPLICATIONS:
        if name == "NASNetMobile":
            with pytest.raises(ModelError, match="no equivalent"):
                zoo.keras_equivalent(name)
            continue
        target = zoo.keras_equivalent(name)
        bare = target.removeprefix("timm:")
        assert target in known or bare in timm.list_models(), (name, target)


@pytest.mark.parametrize(
    ("name", "architecture"),
    [
        ("InceptionResNetV2", "timm.models.inception_resnet_v2"),
        ("mobilenetv2", "torchvision.models.mobilenetv2"),
        ("EfficientNetB0", "timm.models.efficientnet"),
    ],
)
def test_keras_names_load_their_equivalents(name, architecture):
    model = load_model(name, weights=None)
    assert type(model.module).__module__ == architecture
    assert model.num_classes == 1000
    assert model.name.lower().startswith(name.lower())


def test_docs_table_matches_the_mapping():
    text = DOCS.read_text(encoding="utf-8").split("## The tf.keras.applications names")[1]
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", text, flags=re.MULTILINE))
    assert set(rows) == set(zoo.KERAS_APPLICATIONS)
    for name, (candidates, _) in zoo.KERAS_APPLICATIONS.items():
        for candidate in candidates:
            assert f"`{candidate}`" in rows[name], (name, rows[name])


# -- weights ---------------------------------------------------------------------------------------
def test_timm_weights_from_a_file_and_the_wrong_architecture(tmp_path):
    source = timm.create_model("resnet18")
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    model = load_model("timm:resnet18", weights=tmp_path / "r18.pth")
    for key, value in source.state_dict().items():
        assert torch.equal(model.module.state_dict()[key], value), key
    with pytest.raises(ModelError, match=r"layer1\.2\.conv1\.weight"):
        load_model("timm:resnet34", weights=tmp_path / "r18.pth")


def test_wrong_architecture_names_the_mismatched_keys(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pt")
    with pytest.raises(ModelError) as info:
        load_model("resnet34", weights=tmp_path / "r18.pt")
    assert "layer1.2.conv1.weight" in str(info.value)
    torch.save(torchvision.models.squeezenet1_0().state_dict(), tmp_path / "squeeze.pt")
    with pytest.raises(ModelError, match=r"features\.0\.weight \(96, 3, 7, 7\) in the file"):
        load_model("squeezenet1_1", weights=tmp_path / "squeeze.pt")


# -- offline -------------------------------------------------------------------------------------
@pytest.fixture
def empty_caches(monkeypatch, tmp_path):
    """torch hub and Hugging Face caches pointing at empty folders."""
    import huggingface_hub.constants

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    for variable in ("CNNSCAN_OFFLINE", "HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(variable, raising=False)
    return tmp_path


@pytest.fixture
def black_hole(monkeypatch):
    """A network where connections hang (packets dropped), and whether anyone tried."""
    tried = []

    def hang(*args, **kwargs):
        tried.append(args)
        time.sleep(30)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    return tried


@pytest.mark.parametrize("name", ["resnet18", "timm:resnet18", "EfficientNetB0"])
def test_missing_weights_fail_fast_on_a_hanging_network(empty_caches, black_hole, name):
    started = time.perf_counter()
    with pytest.raises(ModelError) as info:
        load_model(name)  # weights="imagenet"
    assert time.perf_counter() - started < zoo.PROBE_SECONDS + 2
    assert black_hole, "the download host was never tried"
    message = str(info.value)
    assert "not cached" in message and "weights=PATH" in message and "weights=None" in message
    assert "checkpoints" in message  # where to put a downloaded file


def test_offline_variable_fails_at_once_without_touching_the_network(
    empty_caches, black_hole, monkeypatch
):
    monkeypatch.setenv("CNNSCAN_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(ModelError, match="not cached"):
        load_model("timm:resnet18")
    assert time.perf_counter() - started < 2
    assert not black_hole


def test_cached_timm_weights_are_used_offline(empty_caches, black_hole, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv("CNNSCAN_OFFLINE", "1")
    config = timm.models.get_pretrained_cfg("resnet18")
    snapshot = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_caches / "hf" / f"models--{config.hf_hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(snapshot)
    (repo / "snapshots" / snapshot).mkdir(parents=True)
    source = timm.create_model("resnet18")
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, repo / "snapshots" / snapshot / "model.safetensors")
    model = load_model("timm:resnet18")
    for key, value in state.items():
        assert torch.equal(model.module.state_dict()[key], value), key
    assert not black_hole


def test_models_without_pretrained_weights_say_so():
    names = [n for n in timm.list_models() if timm.models.get_pretrained_cfg(n) is None]
    if not names:
        pytest.skip("every timm architecture has weights")
    with pytest.raises(ModelError, match="no pretrained weights"):
        load_model(f"timm:{names[0]}")


def test_missing_timm_says_how_to_install(monkeypatch):
    monkeypatch.setattr(zoo, "timm_available", lambda: False)
    with pytest.raises(ModelError, match=r"cnnscan\[timm\]"):
        load_model("InceptionResNetV2", weights=None)
    with pytest.raises(ModelError, match=r"cnnscan\[timm\]"):
        load_model("timm:resnet18", weights=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert isinstance(
            load_model("EfficientNetB0", weights=None).module, torchvision.models.EfficientNet
        )
