"""The audit (SpRAy) on a Clever-Hans data set built here: a hand-built net that calls a
picture "horse" for a green disc and, much more strongly, for a red stamp in the corner; the
audit must put the stamped pictures in their own cluster and flag it. The clustering step
against CoRelAy 1.0 (same affinity, same eigenvalues, same clusters)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

import cnnscan
from cnnscan.cli import main
from cnnscan.errors import AuditError
from cnnscan.spray.demo import clever_hans_images, clever_hans_model
from cnnscan.spray.flags import inspect
from cnnscan.spray.spectral import eigengap, knn_affinity, laplacian_spectrum, spectral_clusters


@pytest.fixture(scope="module")
def clever_hans(tmp_path_factory):
    """The pictures, the model, the stamp of each picture and one audit of LRP maps (the
    batch run included), written to a folder."""
    root = tmp_path_factory.mktemp("clever-hans")
    (root / "images").mkdir()
    table, stamped = clever_hans_images(root / "images")
    model = clever_hans_model()
    found = cnnscan.audit(table, method="lrp", out=root / "audit", model=model, progress=False)
    return root, table, model, stamped, found


def test_the_stamped_horses_are_their_own_flagged_cluster(clever_hans):
    _, _, _, stamped, found = clever_hans
    members = found.members.to_pandas()
    horses = members[members.class_id == 0]
    assert len(horses) == 28  # 24 horses and the 4 stamped others the model calls horses
    truth = [stamped[path] for path in horses.path]
    assert adjusted_rand_score(truth, horses.cluster) >= 0.9
    clusters = found.clusters.to_pandas().set_index(["class_id", "cluster"])
    stamp_cluster = horses[[stamped[p] for p in horses.path]].cluster.mode()[0]
    flagged = clusters.loc[(0, stamp_cluster)]
    assert flagged.suspicious
    assert "of the image" in flagged.reason and "at the border" in flagged.reason
    assert flagged.region_x0 == 0 and flagged.region_y0 == 0 and flagged.region_x1 <= 0.2
    assert flagged.accuracy == pytest.approx(12 / 16)  # the 4 stamped others are wrong
    others = clusters.drop(index=(0, stamp_cluster))
    assert not others.suspicious.any()
    assert found.classes.to_pandas().set_index("class_id").loc[0, "clusters"] == 2


def test_the_page_and_the_tables_are_written(clever_hans):
    root, *_, found = clever_hans
    html = (root / "audit" / "audit.html").read_text(encoding="utf-8")
    assert html.count('class="cluster suspicious"') == 1
    assert "suspicious: 50% of the relevance in" in html
    assert html.count("<img") == 2 + 3 + 6 + 6 + 4  # scatters, mean maps, up to 6 examples
    import pyarrow.parquet as pq

    for name in ("classes", "clusters", "members"):
        assert pq.read_table(root / "audit" / f"{name}.parquet").equals(getattr(found, name))


def test_the_cli_audits_a_finished_batch_output(clever_hans, tmp_path, capsys):
    root, *_ = clever_hans
    code = main(
        ["audit", str(root / "audit" / "batch"), "--classes", "horse", "--out", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "class 0 (horse): 28 maps, 2 clusters, 1 suspicious" in out
    assert (tmp_path / "audit.html").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "gradcam"}, "has no 'gradcam' maps"),
        ({"classes": ["zebra"]}, "no maps of class 'zebra'"),
        ({"size": 2}, "size must be an integer from 4 to 256"),
        ({"max_clusters": 0}, "max_clusters must be"),
        ({"batch_size": 4}, "batch options (batch_size) apply only when explaining images"),
    ],
)
def test_bad_input_is_one_clear_error(clever_hans, kwargs, message):
    root, *_ = clever_hans
    with pytest.raises(AuditError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cnnscan.audit(root / "audit" / "batch", **kwargs)


def test_a_small_fixed_spot_and_a_spread_object_are_told_apart():
    spot = np.zeros((32, 32))
    spot[14:17, 20:23] = 1  # a tag in the middle of the picture: not at the border
    finding = inspect(spot, size=10)
    assert finding.suspicious and "border" not in finding.reason
    assert finding.region == (20 / 32, 14 / 32, 23 / 32, 17 / 32)
    assert not inspect(spot, size=2).suspicious  # two maps are no pattern
    yy, xx = np.mgrid[:32, :32]
    blob = np.exp(-((yy - 16) ** 2 + (xx - 16) ** 2) / 50)
    assert not inspect(blob, size=10).suspicious
    frame = np.zeros((32, 32))
    frame[:2], frame[-2:] = 1, 1
    assert "60%" not in inspect(frame, 10).reason and "border" in inspect(frame, 10).reason


# -- the clustering step against CoRelAy 1.0 -----------------------------------------------
@pytest.fixture(scope="module")
def groups():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (3, 40))
    x = np.concatenate(
        [rng.normal(c, 1, (n, 40)) for c, n in zip(centres, (50, 30, 20), strict=True)]
    )
    return x.astype(np.float32), np.repeat([0, 1, 2], (50, 30, 20))


def test_affinity_eigenvalues_and_clusters_equal_corelay(groups):
    pytest.importorskip("corelay")
    from importlib.metadata import version

    from corelay.pipeline.spectral import SpectralClustering
    from corelay.processor.affinity import SparseKNN
    from corelay.processor.clustering import KMeans
    from corelay.processor.distance import SciPyPDist
    from corelay.processor.embedding import EigenDecomposition
    from corelay.processor.laplacian import SymmetricNormalLaplacian

    assert version("corelay") == "1.0.0"
    x, truth = groups
    theirs = SparseKNN(n_neighbors=10, symmetric=True)(SciPyPDist(metric="euclidean")(x))
    ours = knn_affinity(x, 10)
    assert abs(theirs - ours).max() == 0
    values, _ = EigenDecomposition(n_eigval=12, which="LA")(SymmetricNormalLaplacian()(theirs))
    mine, _ = laplacian_spectrum(ours, 12)
    assert np.allclose(np.sort(values), mine, atol=1e-9)
    k = eigengap(mine, 10)
    assert k == 3
    pipeline = SpectralClustering(
        embedding=EigenDecomposition(n_eigval=k, which="LA"),
        clustering=KMeans(n_clusters=k, kwargs={"n_init": 10, "random_state": 0}),
    )
    their_labels = pipeline(x)
    found = spectral_clusters(x, n_neighbors=10, max_clusters=10)
    assert found.k == 3
    assert adjusted_rand_score(their_labels, found.labels) == 1.0
    assert adjusted_rand_score(truth, found.labels) == 1.0
    assert np.bincount(found.labels).tolist() == [50, 30, 20]  # numbered by size


def test_fewer_than_three_maps_are_one_cluster():
    found = spectral_clusters(np.ones((2, 16), dtype=np.float32))
    assert found.k == 1 and found.labels.tolist() == [0, 0]


def test_the_cli_explains_images_first_with_the_labels_as_targets(tmp_path, monkeypatch, capsys):
    (tmp_path / "images").mkdir()
    table, _ = clever_hans_images(tmp_path / "images")
    monkeypatch.setattr("cnnscan.cli._load", lambda args: clever_hans_model())
    args = ["audit", str(table), "--targets", "label", "--out", str(tmp_path / "a"), "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "class 0 (horse): 24 maps, 2 clusters, 1 suspicious" in out
    assert "class 1 (other): 8 maps, 1 clusters, 0 suspicious" in out
    assert (tmp_path / "a" / "batch" / "run.json").exists()
    assert (tmp_path / "a" / "audit.html").exists()
