"""Targets: every way a user names classes becomes a (n_images, n_targets) LongTensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import DOMESTIC_CATS, SmallConvNet

import cnnscan
from cnnscan import TargetError
from cnnscan.models.labels import imagenet_labels
from cnnscan.targets import resolve_targets

LABELS = imagenet_labels()
LOGITS = torch.randn(2, 1000, generator=torch.Generator().manual_seed(0))


def resolve(targets, logits=LOGITS, labels=LABELS):
    ids = resolve_targets(targets, logits, labels)
    assert ids.dtype == torch.long
    assert ids.ndim == 2
    return ids.tolist()


def numpy_top(k: int) -> list[list[int]]:
    return np.argsort(-LOGITS.numpy(), axis=1)[:, :k].tolist()


@pytest.mark.parametrize("text", ["top5", "TOP5", "top-5", "top_5", " top 5 "])
def test_top_k_strings(text):
    assert resolve(text) == numpy_top(5)


def test_top_one_is_the_default():
    assert resolve(None) == numpy_top(1)
    assert resolve("top1") == numpy_top(1)


@pytest.mark.parametrize("text", ["top0", "top1001"])
def test_top_k_out_of_range(text):
    with pytest.raises(TargetError, match="between 1 and 1000"):
        resolve(text)


def test_int_and_list_of_ints_are_shared_by_the_batch():
    assert resolve(285) == [[285], [285]]
    assert resolve([285, 1, 999]) == [[285, 1, 999]] * 2
    assert resolve((0,)) == [[0], [0]]
    assert resolve(np.int64(7)) == [[7], [7]]
    assert resolve([np.int32(3), "4"]) == [[3, 4]] * 2


def test_class_names_case_insensitive():
    assert resolve(["Egyptian cat", "TABBY", " tiger cat "]) == [[285, 281, 282]] * 2
    assert resolve("espresso") == [[967], [967]]
    assert resolve([285, "tabby"]) == [[285, 281]] * 2


def test_duplicate_label_exact_spelling_wins_and_otherwise_is_ambiguous():
    # ImageNet has two "cardigan" classes: 264 (the corgi) and 474 (the sweater).
    assert LABELS[264] == "Cardigan" and LABELS[474] == "cardigan"
    assert resolve("Cardigan") == [[264], [264]]
    assert resolve("cardigan") == [[474], [474]]
    with pytest.raises(TargetError, match=r"ambiguous.*264.*474"):
        resolve("CARDIGAN")


def test_list_of_lists_per_image():
    assert resolve([[1, 2], [3, 4]]) == [[1, 2], [3, 4]]
    assert resolve([["tabby"], ["tiger cat"]]) == [[281], [282]]
    assert resolve([np.array([5, 6]), torch.tensor([7, 8])]) == [[5, 6], [7, 8]]


def test_ragged_list_of_lists():
    with pytest.raises(TargetError, match="same number"):
        resolve([[1, 2], [3]])


def test_wrong_number_of_rows():
    with pytest.raises(TargetError, match="2 images"):
        resolve([[1, 2]])
    with pytest.raises(TargetError, match="2 images"):
        resolve(torch.tensor([[1], [2], [3]]))


def test_long_tensor():
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert resolve(ids) == ids.tolist()
    assert resolve(torch.tensor([5, 6])) == [[5, 6], [5, 6]]
    assert resolve(torch.tensor(7)) == [[7], [7]]
    assert resolve(np.array([[9], [8]])) == [[9], [8]]
    assert resolve(ids.int()) == ids.tolist()


def test_float_tensor_is_refused_not_truncated():
    with pytest.raises(TargetError, match="integers"):
        resolve(torch.tensor([1.5]))


@pytest.mark.parametrize("bad", [1000, -1, [0, 1000], torch.tensor([[0], [1000]])])
def test_out_of_range(bad):
    with pytest.raises(TargetError, match=r"out of range.*1000 classes"):
        resolve(bad)


def test_unknown_name_suggests_close_matches():
    with pytest.raises(TargetError, match="Egyptian cat") as info:
        resolve("egyptian kat")
    assert "unknown class name" in str(info.value)


def test_unknown_name_without_matches():
    with pytest.raises(TargetError, match="unknown class name") as info:
        resolve("xylophone-zebra-quasar")
    assert "Close matches" not in str(info.value)


@pytest.mark.parametrize("bad", [[], True, 2.0, {"a": 1}, [1.5]])
def test_nonsense(bad):
    with pytest.raises(TargetError):
        resolve(bad)


def test_small_model_range_and_labels():
    logits = torch.zeros(1, 3)
    assert resolve(["b"], logits, ("a", "b", "c")) == [[1]]
    with pytest.raises(TargetError, match="3 classes"):
        resolve(3, logits, ("a", "b", "c"))


# -- through explain ---------------------------------------------------------------------------
def test_explain_top5_matches_the_models_own_ranking(default_model, chelsea):
    x = default_model.preprocess(chelsea)
    with torch.no_grad():
        expected = default_model.module(x).topk(5).indices
    attr = cnnscan.explain(default_model, x, "gradient", targets="top5")
    assert attr.targets.tolist() == expected.tolist()
    assert attr.targets[0, 0] in DOMESTIC_CATS
    assert attr.maps.shape[:2] == (1, 5)


def test_explain_names_and_tensors_agree(default_model, chelsea):
    x = default_model.preprocess(chelsea)
    by_name = cnnscan.explain(default_model, x, "gradient", targets=["egyptian CAT", "tabby"])
    by_id = cnnscan.explain(default_model, x, "gradient", targets=torch.tensor([[285, 281]]))
    assert by_name.targets.tolist() == by_id.targets.tolist() == [[285, 281]]
    torch.testing.assert_close(by_name.maps, by_id.maps)


def test_explain_out_of_range_on_a_small_net():
    with pytest.raises(TargetError, match="5 classes"):
        cnnscan.explain(SmallConvNet(classes=5), torch.zeros(1, 3, 8, 8), targets=[5])
