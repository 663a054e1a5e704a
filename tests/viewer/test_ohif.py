"""What the radiologist sees: lusai's SEG and SR opened in OHIF 3.13.2 in a real browser.

Orthanc (Debian, with its DICOMweb plugin) is the PACS: cines are C-STOREd into it, its Lua rule
routes them to ``lusai serve``, and lusai's outputs come back by C-STORE with the default viewer
profile. The prebuilt OHIF viewer (npm ``@ohif/app``, ``tests/js/fetch-ohif.sh``) then opens each
study from Orthanc's DICOMweb in Debian's Chromium, driven by playwright-core
(``tests/js/ohif_viewer.js``): the SEG is loaded and OHIF's decoded labelmap is compared pixel by
pixel with the masks highdicom reads from the same SEG, on odd and even frames; the SR is opened
and must not crash the viewer, and its key-frame region must be drawn on the key frame around the
scored pleura. Screenshots are kept under ``test-artefacts/viewer/``.

350 x 350 is the size at which a BINARY frame starts mid-byte (the defect OHIF shows); 640 x 480
is byte-aligned. Both photometric forms scanners export are covered: JPEG Baseline YBR_FULL_422
and uncompressed MONOCHROME2.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from service.core.segments import SEGMENTS, SegmentClass
from tests.conftest import (
    ORTHANC_DICOMWEB_PLUGIN,
    REPO,
    free_port,
    missing,
    new_orthanc,
    serve_for_orthanc,
    storescu,
)
from tests.factories import save, us_cine

pytestmark = [pytest.mark.network, pytest.mark.slow, pytest.mark.browser]

JS = REPO / "tests" / "js"
OHIF_DIST = JS / "ohif" / "dist"
ARTEFACTS = REPO / "test-artefacts" / "viewer"

# name, rows, columns, JPEG Baseline YBR_FULL_422 (else MONOCHROME2), frames
CINES = [
    ("jpeg-350x350", 350, 350, True, 10),
    ("mono-350x350", 350, 350, False, 9),
    ("jpeg-640x480", 480, 640, True, 10),
    ("mono-640x480", 480, 640, False, 9),
]


@pytest.fixture(scope="module")
def browser_tools() -> dict[str, str]:
    node = shutil.which("node")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if node is None:
        missing("node (Debian nodejs)")
    if not Path(chromium).exists():
        missing("chromium (Debian chromium)")
    if not (JS / "node_modules" / "playwright-core").is_dir():
        missing("playwright-core (npm ci in tests/js)")
    if not OHIF_DIST.is_dir():
        missing("the OHIF viewer (tests/js/fetch-ohif.sh)")
    return {"node": str(node), "chromium": chromium}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Orthanc with DICOMweb, routing every US instance to lusai (deploy/orthanc/route-to-lusai.lua)."""
    lusai_port = free_port()
    server = new_orthanc(
        tmp_path_factory.mktemp("orthanc"),
        [ORTHANC_DICOMWEB_PLUGIN],
        # Orthanc 1.10 (DCMTK 3.6.7) predates the Label Map Segmentation class: docs/deployment.md
        UnknownSopClassAccepted=True,
        DicomModalities={"lusai": ["LUSAI", "127.0.0.1", lusai_port]},
        LuaScripts=[str(REPO / "deploy" / "orthanc" / "route-to-lusai.lua")],
        DicomWeb={"Enable": True, "Root": "/dicom-web/"},
    )
    server.start()
    yield {"base": server.base, "dicom_port": server.dicom_port, "lusai_port": lusai_port}
    server.stop()


@pytest.fixture(scope="module")
def lusai(tmp_path_factory: pytest.TempPathFactory, pacs: dict[str, Any]) -> Iterator[Path]:
    """``lusai serve`` on embedded defaults: the default viewer profile, results back to Orthanc."""
    with serve_for_orthanc(tmp_path_factory.mktemp("lusai"), pacs["lusai_port"], pacs["dicom_port"]) as log:
        yield log


def _cine(folder: Path, name: str, rows: int, cols: int, jpeg: bool, frames: int) -> Path:
    from workers.training.phantom import make_cine

    c = make_cine(np.random.default_rng(rows + frames), n_frames=frames, src=(rows, cols), kind="convex")
    ds = us_cine(c.frames, syntax="jpeg" if jpeg else "raw", study_uid=generate_uid(), PatientID=name)
    return save(ds, folder / f"{name}.dcm")


def _outputs(base: str, study_uid: str) -> dict[str, bytes]:
    """The SEG and SR of a study in Orthanc, as Part 10 files, once both are there."""
    query = {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}
    found = httpx.post(f"{base}/tools/find", json=query)
    out: dict[str, bytes] = {}
    for study_id in found.json():
        for series in httpx.get(f"{base}/studies/{study_id}/series").json():
            modality = series["MainDicomTags"].get("Modality", "")
            if modality in ("SEG", "SR") and series["Instances"]:
                out[modality] = httpx.get(f"{base}/instances/{series['Instances'][0]}/file").content
    return out


@pytest.fixture(scope="module")
def studies(
    pacs: dict[str, Any], lusai: Path, tmp_path_factory: pytest.TempPathFactory
) -> list[dict[str, Any]]:
    """The four cines sent to the PACS, each back with lusai's SEG and SR."""
    folder = tmp_path_factory.mktemp("cines")
    sent = []
    for name, rows, cols, jpeg, frames in CINES:
        path = _cine(folder, name, rows, cols, jpeg, frames)
        result = storescu(pacs["dicom_port"], path, "ORTHANC")
        assert result.returncode == 0, result.stderr
        sent.append((name, pydicom.dcmread(path, stop_before_pixels=True)))
    done: list[dict[str, Any]] = []
    deadline = time.monotonic() + 600
    for name, source in sent:
        while len(outputs := _outputs(pacs["base"], source.StudyInstanceUID)) < 2:
            assert time.monotonic() < deadline, f"{name}: no SEG/SR in the PACS\n{lusai.read_text()[-4000:]}"
            time.sleep(1)
        done.append({"name": name, "source": source, **outputs})
    return done


@pytest.fixture(scope="module")
def control(pacs: dict[str, Any]) -> dict[str, Any]:
    """A BINARY SEG of a 350 x 350 cine put straight into the PACS (no routing: not of modality
    US), to show the comparison finds the defect the default profile avoids."""
    from tests.factories import make_analysis, make_source
    from workers.write_dicom.build import SEG_ENCODINGS, OutputOptions, build_outputs
    from workers.write_dicom.validate import encode

    # 5 frames: 23 BINARY frames of 122,500 bits, an even byte count (no pad byte, which this
    # reader refuses outright: OHIF would then wait for per-frame requests Orthanc answers 400)
    source = make_source(350, 350, 5, jpeg=False)
    source.Modality = "OT"  # the Lua rule routes US only
    source.StudyInstanceUID = generate_uid()
    options = OutputOptions(seg=SEG_ENCODINGS["binary"], sr=False, overlay=None, validate=False)
    (seg,) = build_outputs(source, make_analysis(source), options=options)
    for ds in (source, seg.dataset):
        r = httpx.post(f"{pacs['base']}/instances", content=encode(ds))
        assert r.status_code == 200, r.text
    return {"name": "binary-350x350-control", "source": source, "SEG": encode(seg.dataset)}


@pytest.fixture(scope="module")
def viewed(
    browser_tools: dict[str, str],
    pacs: dict[str, Any],
    studies: list[dict[str, Any]],
    control: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """Each study opened in OHIF: what it decoded and drew, its console errors, screenshots."""
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    job = {
        "dist": str(OHIF_DIST),
        "orthanc": pacs["base"],
        "out": str(ARTEFACTS),
        "chromium": browser_tools["chromium"],
        "studies": [
            {"name": s["name"], "uid": s["source"].StudyInstanceUID, "frames": _checked(s)} for s in studies
        ]
        + [
            {
                "name": control["name"],
                "uid": control["source"].StudyInstanceUID,
                "frames": _checked(control),
                "sr": False,
                "displaySets": 2,
            }
        ],
    }
    (ARTEFACTS / "job.json").write_text(json.dumps(job))
    run = subprocess.run(
        [browser_tools["node"], str(JS / "ohif_viewer.js"), str(ARTEFACTS / "job.json")],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=JS,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    names = [s["name"] for s in studies] + [control["name"]]
    return {name: json.loads((ARTEFACTS / f"{name}.json").read_text()) for name in names}


def _checked(study: dict[str, Any]) -> list[int]:
    """Frames compared: the first three (odd, even, odd) and the last."""
    n = int(study["source"].NumberOfFrames)
    return sorted({1, 2, 3, n})


def _expected(study: dict[str, Any]) -> np.ndarray:
    """Class map per checked frame, as highdicom reads lusai's SEG (the reference decoder)."""
    import highdicom as hd

    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(study["SEG"])))
    return seg.get_pixels_by_source_frame(
        study["source"].SOPInstanceUID,
        source_frame_numbers=_checked(study),
        combine_segments=True,
        relabel=False,
        skip_overlap_checks=True,
    )


@pytest.mark.parametrize("name", [c[0] for c in CINES])
def test_ohif_decodes_the_seg_pixel_for_pixel(name: str, viewed: dict[str, Any], studies: list[Any]) -> None:
    study = next(s for s in studies if s["name"] == name)
    seg = viewed[name]["seg"]
    assert "error" not in seg, f"{seg['error']} ({seg['screenshot']})"
    assert not seg["crashed"] and seg["problems"] == [], seg["problems"]
    decoded = seg["segmentation"]
    assert decoded["count"] == int(study["source"].NumberOfFrames)  # a labelmap per source frame
    header = pydicom.dcmread(io.BytesIO(study["SEG"]), stop_before_pixels=True)
    assert [s["label"] for s in decoded["segments"]] == [s.SegmentLabel for s in header.SegmentSequence]
    # OHIF shows the names and colours of the one segment table the overlay SC and the REST
    # previews draw with (tests/workers/write_dicom/test_overlay.py, test_previews.py)
    shown = [(s["label"], tuple(s["colour"])) for s in decoded["segments"]]
    table = [(row.label, row.rgb) for row in SEGMENTS]
    assert [label for label, _ in shown] == [label for label, _ in table]
    for (_, got), (label, want) in zip(shown, table, strict=True):
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1, (label, got, want)
    wrong = _wrong_pixels(study, decoded)
    kind = header.SegmentationType
    assert wrong == dict.fromkeys(wrong, 0), f"{name}: wrong pixels per frame {wrong} ({kind})"


def test_the_comparison_sees_the_binary_defect_the_default_avoids(
    viewed: dict[str, Any], control: dict[str, Any]
) -> None:
    """A BINARY SEG of 350 x 350 frames: OHIF 3.13.2 scrambles every SEG frame that starts mid-byte
    (every other one). When a later pinned OHIF reads it right, this test fails, and ``auto`` may
    choose BINARY everywhere again (service/core/profiles.py)."""
    seg = viewed[control["name"]]["seg"]
    assert "error" not in seg, f"{seg['error']} ({seg['screenshot']})"
    wrong = _wrong_pixels(control, seg["segmentation"])
    assert sum(wrong.values()) > 1000, wrong


def _wrong_pixels(study: dict[str, Any], decoded: dict[str, Any]) -> dict[int, int]:
    """Pixels per checked frame where OHIF's labelmap differs from highdicom's reading of the SEG."""
    expected = _expected(study)
    assert any(e.any() for e in expected)  # the comparison is not of empty masks
    wrong = {}
    for i, frame in enumerate(_checked(study)):
        got = decoded["frames"][str(frame)]
        shown = np.frombuffer(base64.b64decode(got["data"]), np.uint8).reshape(got["rows"], got["columns"])
        assert shown.shape == expected[i].shape
        wrong[frame] = int((shown != expected[i]).sum())
    return wrong


@pytest.mark.parametrize("name", [c[0] for c in CINES])
def test_ohif_opens_the_sr_on_the_key_frame_around_the_pleura(
    name: str, viewed: dict[str, Any], studies: list[Any]
) -> None:
    study = next(s for s in studies if s["name"] == name)
    sr = viewed[name]["sr"]
    assert "error" not in sr, f"{sr['error']} ({sr['screenshots']})"
    assert not sr["crashed"], f"{name}: OHIF shows 'Something went wrong' ({sr['screenshots']})"
    assert sr["problems"] == [], sr["problems"]
    report = sr["report"]
    (drawn,) = report["annotations"]  # the key-frame region, the one drawable group
    key_frame, region = _key_frame_region(pydicom.dcmread(io.BytesIO(study["SR"])))
    assert drawn["frame"] == key_frame
    assert [int(i.split("/frames/")[1]) for i in report["current"]] == [key_frame]  # OHIF jumped there
    data = json.loads(drawn["data"])
    (polyline,) = data["renderableData"]["POLYLINE"]
    shown = np.array([p[:2] for p in polyline]) - 0.5  # cornerstone's world = pixel centre
    assert np.abs(shown - region).max() <= 1, (shown, region)
    labels = " ".join(f"{x['label']} {x['value']}" for x in data["labels"])
    assert "LUS score" in labels, labels
    # around the scored pleura: inside the box of the pleural-line segment on that frame
    import highdicom as hd

    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(study["SEG"])))
    classes = seg.get_pixels_by_source_frame(
        study["source"].SOPInstanceUID,
        source_frame_numbers=[key_frame],
        combine_segments=True,
        relabel=False,
        skip_overlap_checks=True,
    )[0]
    rows, cols = np.nonzero(classes == SegmentClass.PLEURAL_LINE)
    assert rows.size, "no pleura on the key frame: the test cine should show one"
    assert shown[:, 0].min() >= cols.min() - 1 and shown[:, 0].max() <= cols.max() + 1
    assert shown[:, 1].min() >= rows.min() - 1 and shown[:, 1].max() <= rows.max() + 1


def _key_frame_region(sr: pydicom.Dataset) -> tuple[int, np.ndarray]:
    """The SR's one SCOORD: its referenced frame and (column, row) points."""
    found: list[tuple[int, np.ndarray]] = []

    def walk(items: Any) -> None:
        for item in items:
            if item.ValueType == "SCOORD":
                (image,) = item.ContentSequence
                frame = int(image.ReferencedSOPSequence[0].ReferencedFrameNumber)
                found.append((frame, np.array(item.GraphicData, dtype=float).reshape(-1, 2)))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    (only,) = found
    return only
