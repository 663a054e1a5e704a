"""Model packages: the shipped one verifies, damage is named, and writing round-trips."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from service.core.model_package import (
    CARD_NAME,
    DEFAULT_PACKAGE,
    FORMAT,
    MANIFEST_NAME,
    PackageError,
    class_names,
    label_set_sha256,
    load_package,
    render_card,
    repackage,
    write_package,
)
from service.core.segments import SegmentClass


@pytest.fixture
def shipped_copy(tmp_path: Path) -> Path:
    dest = tmp_path / "pkg"
    shutil.copytree(DEFAULT_PACKAGE, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _manifest(folder: Path) -> dict:  # type: ignore[type-arg]
    data: dict = json.loads((folder / MANIFEST_NAME).read_text())  # type: ignore[type-arg]
    return data


def test_shipped_package_verifies_and_describes_itself() -> None:
    pkg = load_package(DEFAULT_PACKAGE)
    assert (pkg.name, pkg.version, pkg.parent) == ("lusai-lus-attention-unet", "0.2.1", None)
    assert set(pkg.files) == {"segmenter_torch", "segmenter_onnx", "score_config", "metrics"}
    raw = (DEFAULT_PACKAGE / MANIFEST_NAME).read_bytes()
    assert pkg.package_sha256 == hashlib.sha256(raw).hexdigest()
    # The manifest agrees with what training recorded about the same weights.
    metrics = json.loads(pkg.files["metrics"].read_text())
    assert pkg.sha256s["segmenter_torch"] == metrics["weights_sha256"]
    assert pkg.sha256s["segmenter_onnx"] == metrics["onnx_sha256"]
    assert pkg.training["seed"] == metrics["config"]["seed"] == 0
    assert "phantom" in pkg.training["data"] and pkg.training["labels_sha256"] == label_set_sha256()
    # The class list travels with the weights, in label-value order.
    assert pkg.classes == tuple(class_names()) == tuple(c.name.lower() for c in SegmentClass)
    assert _manifest(DEFAULT_PACKAGE)["classes"] == class_names()
    # Texts name the modules as they are now (training code lives under workers.training).
    text = (DEFAULT_PACKAGE / MANIFEST_NAME).read_text()
    assert "workers.training.phantom" in text and "python -m workers.training.calibrate" in text
    assert "workers.infer.calibrate" not in text and "(workers.phantom)" not in text
    # The operating point is fitted on phantom seed 2027 (nothing fitted on real patients ships);
    # its figure is agreement with phantom truth on an independent seed.
    op = pkg.training["operating_point"]
    assert "Soldati score fitted on synthetic phantom cine only, seed 2027" in op
    assert "--phantom 400 --seed 2027" in op and "no BLUS video" in op
    assert pkg.cv is not None and pkg.cv["phantom_video_score_kappa_qw"] == pytest.approx(0.523)
    assert "Not for diagnosis" in pkg.intended_use
    # The committed card is exactly what the manifest renders to (regenerated, never hand-edited).
    assert (DEFAULT_PACKAGE / CARD_NAME).read_text() == render_card(pkg.manifest, pkg.package_sha256)
    # A file inside the package names the package too.
    assert load_package(pkg.files["segmenter_torch"]).package_sha256 == pkg.package_sha256


def test_tampered_file_is_named(shipped_copy: Path) -> None:
    onnx = shipped_copy / "lus_unet.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"lus_unet\.onnx \(role segmenter_onnx\) has SHA-256") as exc:
        load_package(shipped_copy)
    assert str(shipped_copy) in str(exc.value)
    assert load_package(shipped_copy, verify=False).name == "lusai-lus-attention-unet"  # health-check mode


def test_missing_manifest_says_how_to_make_one(tmp_path: Path) -> None:
    shutil.copyfile(DEFAULT_PACKAGE / "lus_unet.pt", tmp_path / "lus_unet.pt")
    with pytest.raises(PackageError, match=r"is not a model package.*lusai model package"):
        load_package(tmp_path / "lus_unet.pt")
    with pytest.raises(PackageError, match="no such file"):
        load_package(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["files"].pop("segmenter_torch"), "required file role segmenter_torch is missing"),
        (lambda m: m.update(format="lusai-model-package/9"), "format 'lusai-model-package/9'"),
        (lambda m: m.pop("version"), "field 'version' is missing"),
        (lambda m: m.update(version="1.0 beta"), "version '1.0 beta' must match"),
        (lambda m: m.update(created="yesterday"), "not an ISO-8601"),
        (lambda m: m.update(parent={"name": "x"}), "parent.version is missing"),
        (lambda m: m["files"]["metrics"].update(path="../metrics.json"), "must be a distinct plain file"),
        (lambda m: m["files"]["metrics"].update(sha256="XYZ"), "files.metrics.sha256"),
        (lambda m: m["training"].update(labels=["background", "b_line"]), "training.labels"),
        (lambda m: m.update(classes=["background", "b_line"]), r"classes \['background', 'b_line'\] are not"),
        (lambda m: m.update(classes=class_names()[::-1]), "names in label-value order"),
    ],
)
def test_bad_manifest_is_refused(shipped_copy: Path, change: object, message: str) -> None:
    m = _manifest(shipped_copy)
    change(m)  # type: ignore[operator]
    (shipped_copy / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(PackageError, match=message):
        load_package(shipped_copy)


def test_package_without_class_list_reads_the_trained_labels(shipped_copy: Path) -> None:
    """Packages written before ``classes`` existed load; re-packaging records the list."""
    m = _manifest(shipped_copy)
    del m["classes"]
    (shipped_copy / MANIFEST_NAME).write_text(json.dumps(m, indent=2) + "\n")
    assert load_package(shipped_copy).classes == tuple(class_names())
    del m["training"]["labels"]
    (shipped_copy / MANIFEST_NAME).write_text(json.dumps(m, indent=2) + "\n")
    assert load_package(shipped_copy).classes == tuple(class_names())
    assert _manifest(repackage(shipped_copy).path)["classes"] == class_names()


def test_missing_listed_file_and_broken_json(shipped_copy: Path) -> None:
    (shipped_copy / "score_config.json").unlink()
    with pytest.raises(PackageError, match=r"score_config\.json \(role score_config\) is missing"):
        load_package(shipped_copy)
    (shipped_copy / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(PackageError, match="not valid JSON"):
        load_package(shipped_copy)


def test_write_package_round_trip_and_card(tmp_path: Path) -> None:
    parent = load_package(DEFAULT_PACKAGE)
    notes = tmp_path / "notes.txt"
    notes.write_text("site calibration notes\n")
    scorer = tmp_path / "head.pt"
    scorer.write_bytes(b"not really a torch file, carried and verified only")
    out = tmp_path / "out" / "pkg"
    pkg = write_package(
        out,
        name="lusai-site-a",
        version="0.2.0+site.a",
        files={
            "segmenter_torch": parent.files["segmenter_torch"],
            "score_config": parent.files["score_config"],
            "scorer_torch": scorer,
            "site_notes": notes,
        },
        parent=parent,
        description="Site A operating point.",
        training={"method": "re-calibration only", "seed": 7, "counts": {"videos": 40}},
        cv={"kappa_qw": 0.41, "folds": {"n": 5}},
        intended_use="Research at site A.",
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST_NAME, CARD_NAME, "lus_unet.pt", "score_config.json", "scorer.pt", "site_notes.txt"]
    )
    again = load_package(out)
    assert again == pkg and again.parent == parent.identity()
    assert again.files["scorer_torch"].read_bytes() == scorer.read_bytes()
    assert again.sha256s["segmenter_torch"] == parent.sha256s["segmenter_torch"]
    assert again.training["counts"] == {"videos": 40} and again.created.endswith("Z")
    assert _manifest(out)["format"] == FORMAT and _manifest(out)["classes"] == class_names()
    card = (out / CARD_NAME).read_text()
    assert card.startswith("# Model card: lusai-site-a 0.2.0+site.a")
    assert parent.package_sha256 in card and pkg.package_sha256 in card
    assert f"| classes (label order) | {', '.join(class_names())} |" in card
    assert "| kappa_qw | 0.41 |" in card and "| folds.n | 5 |" in card
    assert "Research at site A." in card and "**seed**: 7" in card
    for role, digest in pkg.sha256s.items():
        assert f"| {role} |" in card and digest in card
    # Replacing the package: the old files go, readers never see a mix.
    smaller = write_package(out, name="lusai-site-a", version="2", files={"segmenter_torch": notes})
    assert sorted(p.name for p in out.iterdir()) == [CARD_NAME, "lus_unet.pt", MANIFEST_NAME]
    assert smaller.package_sha256 != pkg.package_sha256 and smaller.cv is None
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_write_package_refuses_foreign_folder_and_bad_input(tmp_path: Path) -> None:
    weights = DEFAULT_PACKAGE / "lus_unet.pt"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("precious")
    with pytest.raises(PackageError, match="not empty and not a model package"):
        write_package(busy, name="m", version="1", files={"segmenter_torch": weights})
    assert (busy / "thesis.tex").exists()
    write_package(busy, name="m", version="1", files={"segmenter_torch": weights}, overwrite=True)
    assert not (busy / "thesis.tex").exists()
    with pytest.raises(PackageError, match="required file role segmenter_torch"):
        write_package(tmp_path / "a", name="m", version="1", files={"score_config": weights})
    with pytest.raises(PackageError, match="role name"):
        write_package(
            tmp_path / "b", name="m", version="1", files={"segmenter_torch": weights, "Bad/Role": weights}
        )
    with pytest.raises(PackageError, match="does not exist"):
        write_package(tmp_path / "c", name="m", version="1", files={"segmenter_torch": tmp_path / "none.pt"})
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_repackage_is_idempotent_and_follows_file_changes(shipped_copy: Path) -> None:
    before = load_package(shipped_copy)
    assert repackage(shipped_copy).package_sha256 == before.package_sha256  # nothing changed
    (shipped_copy / CARD_NAME).unlink()
    assert repackage(shipped_copy).package_sha256 == before.package_sha256
    assert (shipped_copy / CARD_NAME).read_text() == render_card(before.manifest, before.package_sha256)
    cfg = json.loads((shipped_copy / "score_config.json").read_text())
    (shipped_copy / "score_config.json").write_text(json.dumps({**cfg, "persist_s": 0.2}))
    with pytest.raises(PackageError, match="score_config"):
        load_package(shipped_copy)
    after = repackage(shipped_copy, version="0.2.1")
    assert after.package_sha256 != before.package_sha256 and after.version == "0.2.1"
    assert after.training == before.training and after.cv == before.cv  # carried over
    assert after.sha256s["segmenter_torch"] == before.sha256s["segmenter_torch"]


def test_repackage_loose_training_output(tmp_path: Path) -> None:
    for name in ("lus_unet.pt", "lus_unet.onnx", "metrics.json"):
        shutil.copyfile(DEFAULT_PACKAGE / name, tmp_path / name)
    with pytest.raises(PackageError, match="give it a name and a version"):
        repackage(tmp_path)
    pkg = repackage(tmp_path, name="lusai-x", version="1.0.0")  # in place: only the packaged files there
    assert set(pkg.files) == {"segmenter_torch", "segmenter_onnx", "metrics"}
    assert pkg.training["seed"] == 0 and pkg.training["labels_sha256"] == label_set_sha256()
