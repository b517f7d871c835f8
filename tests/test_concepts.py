"""Concepts (CRP): channel relevances against zennit-crp 0.6.0 and plain autograd, the
conservation of conditional heatmaps, and the ablation check on the default model."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers import (
    SmallConvNet,
    assert_unchanged,
    batchnorm_eps,
    decode,
    efficientnet_lite_canonizers,
    parse,
    pearson,
    snapshot,
)
from torch import nn

import cnnscan
from cnnscan.cli import main
from cnnscan.concept import concept_graph, pictures
from cnnscan.errors import BatchError, LayerError, MethodError
from cnnscan.models.preprocessing import Preprocessing
from cnnscan.scan import make_scan
from cnnscan.synthesis import channels

LAYER = "features.14"  # vgg11: the ReLU after the 6th conv, 512 channels


@functools.cache
def vgg() -> nn.Module:
    """A random-weight vgg11 (built once; tests never change it)."""
    torch.manual_seed(0)
    return torchvision.models.vgg11(weights=None).eval()


@pytest.fixture(scope="module")
def small() -> torch.Tensor:
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.mark.slow
def test_concepts_match_zennit_crp(small):
    """Channel relevances and each concept's conditional heatmap equal zennit-crp's
    `CondAttribution` with the same composite (ε-plus) and conditions."""
    crp = pytest.importorskip("crp.attribution")
    from zennit.composites import EpsilonPlus

    target = 3
    found = cnnscan.concepts(
        vgg(), small, [target], layer=LAYER, composite="epsilon_plus", pictures=False
    )
    ours = found[0]
    reference = crp.CondAttribution(vgg_copy())
    x = small.clone().requires_grad_(True)
    whole = reference(x, [{"y": [target]}], EpsilonPlus(), record_layer=[LAYER])
    theirs = whole.relevances[LAYER][0].sum(dim=(1, 2))
    assert torch.allclose(ours.channels, theirs, rtol=1e-4, atol=1e-6 * theirs.abs().max())
    channels = [concept.channel for concept in ours.concepts]
    assert channels == theirs.argsort(descending=True)[: len(channels)].tolist()
    conditions = [{"y": [target], LAYER: [c]} for c in channels]
    maps = reference(x, conditions, EpsilonPlus()).heatmap
    for concept, theirs_map in zip(ours.concepts, maps, strict=True):
        assert pearson(concept.heatmap, theirs_map) > 0.9999, concept.channel
        error = (concept.heatmap - theirs_map).abs().max() / theirs_map.abs().max()
        assert error < 1e-4, (concept.channel, float(error))


def vgg_copy() -> nn.Module:
    """zennit-crp switches off the parameters' gradients of the model it is given."""
    clone = torchvision.models.vgg11(weights=None).eval()
    clone.load_state_dict(vgg().state_dict())
    return clone


@pytest.mark.parametrize(
    "method", [pytest.param("lrp", marks=pytest.mark.slow), "gradient_x_activation"]
)
def test_all_conditional_heatmaps_sum_to_the_unconditional_one(small, method):
    """With every channel as a concept, the conditional heatmaps add up to the method's
    unconditional heatmap (LRP, or gradient × input), and the channels' relevances to the
    layer total."""
    layer = "features.7"  # 256 channels at 4×4
    found = cnnscan.concepts(
        vgg(), small, [5], layer=layer, top=256, method=method, check=False, pictures=False
    )
    target = found[0]
    assert len(target.concepts) == 256
    total = sum(concept.heatmap for concept in target.concepts)
    if method == "lrp":
        whole = cnnscan.explain(vgg(), small, "lrp", targets=[5]).maps[0, 0].sum(dim=0)
    else:
        x = small.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(vgg()(x)[0, 5], x)
        whole = (x * grad)[0].detach().sum(dim=0)
    assert torch.allclose(total, whole, atol=1e-5 * float(whole.abs().max()))
    assert float(target.channels.sum()) == pytest.approx(target.layer_total, rel=1e-5)
    shares = sum(concept.share for concept in target.concepts)
    assert shares == pytest.approx(1.0, abs=1e-4)


def test_gradient_x_activation_relevance_is_activation_times_gradient(small):
    """Each channel's relevance is Σ activation × ∂logit/∂activation over its positions."""
    found = cnnscan.concepts(
        vgg(), small, [1], layer=LAYER, method="gradient_x_activation", check=False, pictures=False
    )[0]
    recorded = {}
    handle = vgg().features[14].register_forward_hook(lambda m, i, o: recorded.update(out=o))
    try:
        logits = vgg()(small.clone().requires_grad_(True))
        (grad,) = torch.autograd.grad(logits[0, 1], recorded["out"])
    finally:
        handle.remove()
    expected = (recorded["out"] * grad)[0].detach().sum(dim=(1, 2))
    assert torch.allclose(found.channels, expected, rtol=1e-4, atol=1e-7)
    assert found.layer_total == pytest.approx(float(expected.sum()), rel=1e-4)
    ranked = [concept.channel for concept in found.concepts]
    assert ranked == expected.argsort(descending=True)[:6].tolist()


@pytest.mark.slow
def test_zeroing_the_top_concepts_lowers_the_cat_logit_more_than_random_ones(
    default_model, chelsea
):
    """The faithfulness check on the bundled model and the cat: the three most relevant
    channels of the last block matter more to the logit than any of 20 random triples."""
    before = snapshot(default_model.module)
    found = cnnscan.concepts(default_model, chelsea, top=3, pictures=False)
    assert_unchanged(before, default_model.module)
    target = found[0]
    assert found.layer == "_swish@1" and found.shape == (1280, 7, 7)
    check = target.ablation
    assert check is not None and check.channels == [c.channel for c in target.concepts]
    assert check.top > max(check.random), (check.top, check.random)
    # the same check done by hand: zero the channels at the layer with a forward hook
    module = default_model.module
    calls = []

    def zero(_module, _inputs, output):
        calls.append(1)
        if len(calls) == 2:  # the second call of the shared `_swish`: the last block
            output = output.clone()
            output[:, check.channels] = 0
        return output

    x = default_model.inputs(chelsea)
    with torch.no_grad():
        plain = module(x)[0, target.class_id]
        handle = module._swish.register_forward_hook(zero)
        try:
            zeroed = module(x)[0, target.class_id]
        finally:
            handle.remove()
    assert float(plain - zeroed) == pytest.approx(check.top, rel=1e-3, abs=1e-4)


def test_bad_requests_are_one_line_errors(small):
    with pytest.raises(MethodError, match="method must be one of"):
        cnnscan.concepts(vgg(), small, layer=LAYER, method="occlusion")
    with pytest.raises(LayerError, match="no layer named"):
        cnnscan.concepts(vgg(), small, layer="features.99")
    with pytest.raises(LayerError, match="channels, height, width"):
        cnnscan.concepts(vgg(), small, layer="classifier.0")
    with pytest.raises(MethodError, match="one image at a time"):
        cnnscan.concepts(vgg(), torch.cat([small, small]), layer=LAYER)
    with pytest.raises(MethodError, match="top"):
        cnnscan.concepts(vgg(), small, layer=LAYER, top=0)
    with pytest.raises(BatchError, match="does not exist"):
        cnnscan.concepts(vgg(), small, layer=LAYER, references="no/such/folder")


# -- what a concept looks like ---------------------------------------------------------------
def small_model() -> cnnscan.Model:
    return cnnscan.load_model(SmallConvNet(), preprocessing=Preprocessing(size=(48, 48)))


def test_feature_pictures_are_cached_per_channel(monkeypatch, tmp_path):
    """The first call draws the channels in one batched run and stores them under the cache
    folder; asking again draws nothing, asking for one more draws only that one."""
    monkeypatch.setenv("CNNSCAN_CACHE", str(tmp_path))
    model = small_model()
    drawn = []
    real = pictures.synthesize

    def spy(model, objective, **options):
        drawn.append(objective.name)
        return real(model, objective, **options)

    monkeypatch.setattr(pictures, "synthesize", spy)
    first = pictures.feature_pictures(model, "conv3", [1, 4], steps=3, size=24)
    assert drawn == ["channels(conv3:1,4)"]
    assert {k: v.shape for k, v in first.items()} == {1: (24, 24, 3), 4: (24, 24, 3)}
    stored = sorted((tmp_path / "concepts").rglob("*.png"))
    assert [path.name for path in stored] == ["1.png", "4.png"]
    again = pictures.feature_pictures(model, "conv3", [4, 1], steps=3, size=24)
    assert drawn == ["channels(conv3:1,4)"] and list(again) == [4, 1]
    assert all(np.array_equal(again[k], first[k]) for k in (1, 4))
    pictures.feature_pictures(model, "conv3", [1, 6], steps=3, size=24)
    assert drawn == ["channels(conv3:1,4)", "channels(conv3:6)"]


def test_channels_objective_draws_one_channel_per_image():
    """Image i of the batch excites channel ks[i]: each image drives its own channel
    higher than the other image does."""
    model = small_model()
    result = cnnscan.synthesize(model, channels("conv3", [2, 5]), steps=24, size=32, batch=2)
    x = model.preprocessing.normalize(result.pixels)
    maps = cnnscan.feature_maps(model, x, "conv3")["conv3"]
    assert float(maps[0, 2].mean()) > float(maps[1, 2].mean())
    assert float(maps[1, 5].mean()) > float(maps[0, 5].mean())


def test_pictures_excite_the_input_of_an_activation_layer(default_model):
    scan = make_scan(default_model, torch.zeros(1, 3, 224, 224))
    assert pictures.picture_layer(scan, "_swish@1") == "_bn1"
    assert pictures.picture_layer(scan, "_blocks.15") == "_blocks.15"
    with pytest.raises(LayerError, match="no layer named"):
        pictures.picture_layer(scan, "_nope")


@pytest.mark.parametrize("method", ["lrp", "gradient_x_activation"])
def test_reference_patches_equal_a_brute_force_loop(tmp_path, method):
    """The most activating and most relevant images of a folder, per concept, are those a
    loop of single-image calls finds, and each patch is cut around the channel's peak."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("chelsea", "coffee", "astronaut", "rocket", "coins"):
        cnnscan.load_image(f"sample:{name}").save(folder / f"{name}.png")
    model = small_model()
    found = cnnscan.concepts(
        model,
        folder / "coffee.png",
        layer="conv3",
        top=3,
        method=method,
        check=False,
        pictures=False,
        references=folder,
        reference_count=2,
    )
    activation, mean, relevance = {}, {}, {}
    for path in sorted(folder.iterdir()):
        maps = cnnscan.feature_maps(model, path, "conv3")["conv3"][0]
        activation[path.name] = maps.flatten(1).max(dim=1).values
        mean[path.name] = maps.flatten(1).mean(dim=1)
        alone = cnnscan.concepts(
            model, path, layer="conv3", top=8, method=method, check=False, pictures=False
        )
        relevance[path.name] = alone[0].channels
    for concept in found[0].concepts:
        c = concept.channel
        for kind, values in (("activation", activation), ("relevance", relevance)):
            ties = mean if kind == "activation" else values  # equal maxima: by the mean

            def rank(name, values=values, ties=ties, c=c):
                return (-float(values[name][c]), -float(ties[name][c]))

            expected = sorted(values, key=rank)[:2]
            patches = concept.references[kind]
            assert [Path(p.source).name for p in patches] == expected, (kind, c)
            for patch in patches:
                assert patch.value == pytest.approx(
                    float(values[Path(patch.source).name][c]), rel=1e-4, abs=1e-6
                )
                left, top, right, bottom = patch.box
                assert patch.pixels.shape == (bottom - top, right - left, 3)


# -- the page and the command ----------------------------------------------------------------
def photo_folder(root: Path, names: tuple[str, ...]) -> Path:
    folder = root / "photos"
    folder.mkdir()
    for name in names:
        cnnscan.load_image(f"sample:{name}").save(folder / f"{name}.png")
    return folder


def test_the_page_is_self_contained_and_shows_every_concept(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNSCAN_CACHE", str(tmp_path / "cache"))
    folder = photo_folder(tmp_path, ("chelsea", "coffee", "rocket"))
    found = cnnscan.concepts(
        small_model(),
        folder / "coffee.png",
        [0, 2],
        layer="conv3",
        top=3,
        references=folder,
        reference_count=2,
    )
    page, data = found.save(tmp_path / "out")
    html = page.read_text()
    tables = parse(html).tables
    assert [t["class"] for t in tables] == ["concepts", "concepts"]
    for table, target in zip(tables, found.targets, strict=True):
        rows = table["rows"][1:]
        assert [int(row[1]["text"]) for row in rows] == [c.channel for c in target.concepts]
        for row, concept in zip(rows, target.concepts, strict=True):
            # heatmap, footprint, picture, then 2 most activating and 2 most relevant patches
            assert [len(cell["images"]) for cell in row[3:]] == [1, 1, 1, 2, 2]
            assert decode(row[5]["images"][0]["src"]).shape[2] == 3
            assert f"{100 * concept.share:+.1f} %" in row[2]["text"]
    sources = [img["src"] for img in parse(html).images]
    assert sources and all(src.startswith("data:image/") for src in sources)
    assert "<link" not in html and "<script" not in html
    assert json.loads(data.read_text())["targets"][1]["class_id"] == 2
    fragment = found._repr_html_()
    assert "<html" not in fragment and 'class="concepts"' in fragment


def test_the_command_writes_the_page(tmp_path, capsys):
    folder = photo_folder(tmp_path, ("coffee", "chelsea"))
    out = tmp_path / "out"
    argv = ["concepts", "sample:coffee", "--top", "2", "--no-pictures", "--out", str(out)]
    code = main([*argv, "--references", str(folder)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "espresso: " in printed.out and "zeroing the top 2" in printed.out
    rows = parse((out / "concepts.html").read_text()).tables[0]["rows"]
    assert len(rows) == 3 and [len(cell["images"]) for cell in rows[1][3:]] == [1, 1, 0, 2, 2]
    assert main(["concepts", "sample:coffee", "--layer", "_nope", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cnnscan: error: no layer named '_nope'") and err.count("\n") == 1


# -- the attribution graph -------------------------------------------------------------------
@pytest.mark.slow
def test_the_attribution_graph_matches_zennit_crp_two_levels_deep(small):
    """Each level's children and their relevances are zennit-crp's relevance at the lower
    layer with the path above as condition ({"y", upper: [k], ...} and record_layer)."""
    crp = pytest.importorskip("crp.attribution")
    from zennit.composites import EpsilonPlus

    layers = ["features.14", "features.9", "features.4"]
    roots = concept_graph(vgg(), small, [3], layers=layers, top=2, composite="epsilon_plus")
    reference = crp.CondAttribution(vgg_copy())
    x = small.clone().requires_grad_(True)

    def theirs(condition: dict, layer: str) -> torch.Tensor:
        found = reference(x, [{"y": [3], **condition}], EpsilonPlus(), record_layer=[layer])
        return found.relevances[layer][0].sum(dim=(1, 2))

    def check(nodes, expected: torch.Tensor) -> None:
        assert [n.channel for n in nodes] == expected.argsort(descending=True)[:2].tolist()
        got = torch.tensor([n.relevance for n in nodes], dtype=expected.dtype)
        want = expected[[n.channel for n in nodes]]
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))

    check(roots, theirs({}, layers[0]))
    assert [len(root.children) for root in roots] == [2, 2]
    for root in roots:
        check(root.children, theirs({layers[0]: [root.channel]}, layers[1]))
        for child in root.children:
            path = {layers[0]: [root.channel], layers[1]: [child.channel]}
            check(child.children, theirs(path, layers[2]))
    with pytest.raises(LayerError, match="does not feed"):
        concept_graph(vgg(), small, [3], layers=["features.4", "features.14"])


@pytest.mark.slow
def test_default_model_concepts_match_zennit_crp(default_model):
    """The bundled EfficientNet-Lite0 (depthwise convs with ε, merged BatchNorms, skip
    connections through zennit's Sum) at its last block: the same channel relevances and
    conditional heatmaps as zennit-crp with the canonizers it needs."""
    crp = pytest.importorskip("crp.attribution")
    from zennit.composites import EpsilonPlus, MixedComposite, NameMapComposite
    from zennit.rules import Epsilon

    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    layer = "_blocks.15"
    net = copy.deepcopy(default_model.module).eval()
    depthwise = tuple(
        name
        for name, module in net.named_modules()
        if isinstance(module, nn.Conv2d) and module.groups == module.in_channels > 1
    )
    with batchnorm_eps(net, 1e-12):  # zennit's merge keeps x/√(1+ε) in each BatchNorm
        found = cnnscan.concepts(net, x, [7], layer=layer, top=4, pictures=False, check=False)
        composite = MixedComposite(
            [NameMapComposite([(depthwise, Epsilon(0.25))]), EpsilonPlus()],
            canonizers=efficientnet_lite_canonizers(net),
        )
        reference = crp.CondAttribution(net, no_param_grad=False)
        leaf = x.clone().requires_grad_(True)
        whole = reference(leaf, [{"y": [7]}], composite, record_layer=[layer])
        conditions = [{"y": [7], layer: [c.channel]} for c in found[0].concepts]
        maps = reference(leaf, conditions, composite).heatmap
    theirs = whole.relevances[layer][0].sum(dim=(1, 2))
    assert torch.allclose(found[0].channels, theirs, rtol=1e-3, atol=1e-4 * theirs.abs().max())
    for concept, theirs_map in zip(found[0].concepts, maps, strict=True):
        assert pearson(concept.heatmap, theirs_map) > 0.9999, concept.channel
