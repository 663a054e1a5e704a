"""Analyzer end to end on phantom cine wrapped in DICOM, and its refusals of unusable input."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest

from service.core.model_package import DEFAULT_PACKAGE, load_package, write_package
from service.core.segments import SegmentClass as C
from workers.pipeline import Analyzer, InputError
from workers.preprocess.wrap import frames_to_dataset
from workers.training.phantom import make_cine


@pytest.fixture(scope="module")
def analyzer() -> Analyzer:
    return Analyzer(device="cpu")


def _ds(scenario: str, seed: int = 0, n: int = 10) -> tuple[pydicom.Dataset, np.ndarray]:
    c = make_cine(np.random.default_rng(seed), n_frames=n, src=(300, 300), scenario=scenario, kind="convex")
    ds = frames_to_dataset(c.frames, mm_per_pixel=c.sector.mm_per_pixel)
    ds.PatientName = "SECRET^PATIENT"
    return ds, c.labels


def test_white_lung_cine_end_to_end(analyzer: Analyzer) -> None:
    ds, truth = _ds("white_lung", seed=1)
    a = analyzer.analyze(ds)
    assert a.frames == 10 and a.labels.shape == truth.shape and a.labels.dtype == np.uint8
    assert a.sop_instance_uid == ds.SOPInstanceUID
    shipped = load_package(DEFAULT_PACKAGE)
    assert (a.model.name, a.model.version) == (shipped.name, shipped.version)
    assert shipped.name == "lusai-lus-attention-unet"
    assert a.model.weights_sha256 == shipped.sha256s["segmenter_torch"]
    assert a.model.package_sha256 == shipped.package_sha256
    assert {"decode", "preprocess", "infer", "score", "labels", "total"} <= set(a.timings_ms)
    assert len(a.findings.frame_scores) == 10
    # The network finds the B-lines where the phantom drew them.
    t, p = truth == C.B_LINE, a.labels == C.B_LINE
    assert 2 * (t & p).sum() / (t.sum() + p.sum()) > 0.6
    assert a.findings.score >= 2 and a.findings.b_line_fraction > 0.4
    js = a.to_json()
    assert js["score"] == a.findings.score and js["frames"] == 10


def test_normal_cine_scores_low(analyzer: Analyzer) -> None:
    ds, _ = _ds("normal", seed=2)
    a = analyzer.analyze(ds)
    # Frame-level: single-frame false positives decide a video under the 1% rule, so judge frames.
    assert np.median(a.findings.frame_scores) <= 1 and a.findings.b_line_fraction < 0.3


def test_probabilities_in_source_grid() -> None:
    ds, truth = _ds("b_lines", seed=3, n=3)
    a = Analyzer(device="cpu", keep_probabilities=True).analyze(ds)
    assert a.probabilities is not None and a.probabilities.shape == (3, 7, *truth.shape[1:])


def _assert_refused(analyzer: Analyzer, ds: pydicom.Dataset, match: str) -> None:
    with pytest.raises(InputError, match=match) as exc:
        analyzer.analyze(ds)
    assert "SECRET" not in str(exc.value)


def test_refuses_unusable_input(analyzer: Analyzer, tmp_path: Path) -> None:
    ds, _ = _ds("normal", n=3)
    bad = copy.deepcopy(ds)
    bad.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT
    _assert_refused(analyzer, bad, "not an ultrasound")
    bad = copy.deepcopy(ds)
    del bad.PixelData
    _assert_refused(analyzer, bad, "no pixel data")
    bad = copy.deepcopy(ds)
    bad.NumberOfFrames = 0
    _assert_refused(analyzer, bad, "invalid image size")
    bad = copy.deepcopy(ds)
    bad.NumberOfFrames = 4  # frames and pixel data disagree
    _assert_refused(analyzer, bad, "bytes")
    blank = frames_to_dataset(np.zeros((3, 64, 64), np.uint8))
    _assert_refused(analyzer, blank, "sector")
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(InputError):
        analyzer.analyze_file(junk)


def test_shipped_operating_point_and_refine_stage(analyzer: Analyzer, tmp_path: Path) -> None:
    """The thresholds calibrated for the network ship in its package and are the ones used."""
    from workers.score.lus import ScoreConfig, load_score_config

    pkg = load_package(DEFAULT_PACKAGE)
    shipped = pkg.file("score_config")
    assert shipped is not None and shipped.exists()
    assert analyzer.score_config == load_score_config(shipped)
    # A package without a calibration falls back to the clinical cut-offs.
    files = {r: pkg.files[r] for r in ("segmenter_torch", "segmenter_onnx")}
    bare_pkg = write_package(tmp_path / "bare", name="bare", version="1", files=files)
    bare = Analyzer(bare_pkg.path, device="cpu")
    assert bare.score_config == ScoreConfig()
    assert bare.model.weights_sha256 == analyzer.model.weights_sha256
    assert bare.model.package_sha256 != analyzer.model.package_sha256
    ds, _ = _ds("b_lines", n=3)
    assert "refine" in analyzer.analyze(ds).timings_ms
