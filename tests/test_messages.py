"""Issue 16, item 7: each message names what is wrong with the file: a symbolic link loop
is not "no such image file", an empty .onnx is not "IR too old", a garbage .keras is not
"File not found"."""

from __future__ import annotations

import os

import pytest

import cnnscan
from cnnscan.errors import ImageError, ModelError


@pytest.fixture
def loop(tmp_path):
    """a.jpg -> b.jpg -> a.jpg, and the same for a model file."""
    for suffix in (".jpg", ".onnx"):
        os.symlink(tmp_path / f"b{suffix}", tmp_path / f"a{suffix}")
        os.symlink(tmp_path / f"a{suffix}", tmp_path / f"b{suffix}")
    return tmp_path


def test_a_symbolic_link_loop_is_named(loop):
    with pytest.raises(ImageError, match=r"a\.jpg is a symbolic link loop"):
        cnnscan.load_image(loop / "a.jpg")
    with pytest.raises(ModelError, match=r"a\.onnx is a symbolic link loop"):
        cnnscan.load_model(loop / "a.onnx")
    with pytest.raises(ModelError, match=r"a\.jpg is a symbolic link loop"):
        cnnscan.load_model("resnet18", weights=loop / "a.jpg")


def test_a_broken_link_names_its_target(tmp_path):
    os.symlink(tmp_path / "gone.png", tmp_path / "link.png")
    with pytest.raises(ImageError, match=r"broken symbolic link: its target .*gone.png"):
        cnnscan.load_image(tmp_path / "link.png")


def test_an_empty_onnx_file_is_called_empty(tmp_path):
    pytest.importorskip("onnx")
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(ModelError, match=r"model.onnx is empty \(0 bytes\): not an ONNX model"):
        cnnscan.load_model(tmp_path / "model.onnx")


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", r"is empty \(0 bytes\)"), (b"\x17garbage" * 40, "is not a zip archive")],
    ids=["empty", "garbage"],
)
def test_a_keras_file_that_is_not_an_archive_says_so(tmp_path, content, message):
    (tmp_path / "model.keras").write_bytes(content)
    with pytest.raises(ModelError, match=f"model.keras {message}.*not a Keras model"):
        cnnscan.load_model(tmp_path / "model.keras")
