"""DICOM Segmentation (PS3.3 A.51, C.8.20) of a multi-frame ultrasound cine.

highdicom 0.28 cannot derive a SEG from a multi-frame source without a patient coordinate system
("Only a single frame is supported ...", highdicom issue #284): ultrasound cines have no plane
positions. The SEG is therefore assembled here with pydicom, using highdicom only for the
validated Segment Description and Algorithm Identification items:

* frames are indexed by Segment Number and Temporal Position Index (Multi-frame Dimension module,
  C.7.6.17); no Plane Position (Patient) is invented;
* each SEG frame references its source frame in DerivationImageSequence/SourceImageSequence with
  ReferencedFrameNumber (C.7.6.16.2.6) and the source series in ReferencedSeriesSequence (C.12.2);
  OHIF does not load a SEG without the latter;
* a shared Plane Orientation [1,0,0,0,1,0] and Pixel Measures from the US region calibration are
  added together with a Frame of Reference (the source's, or a derived one), which
  cornerstone3D's SEG loader requires;
* BINARY frames are bit-packed back to back without per-frame padding (PS3.5 8.1.1), which matters
  when rows x columns is not a multiple of 8 (BLUS cines are 350 x 350).

Segments are rows of :data:`service.core.segments.SEGMENTS`, numbered by class value and always
all described.
A BINARY SEG has a frame for a segment and a source frame only where that segment has pixels on
that frame (C.8.20.2 does not ask for empty frames, and a normal lung leaves most of them empty);
an all-background cine keeps one empty frame per segment so the object is never empty. A
LABELMAP SEG has one frame per selected source frame.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Literal

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    RLELossless,
    SegmentationStorage,
)

from service.core.dicom import LABEL_MAP_SEGMENTATION_STORAGE, ultrasound_region
from service.core.segments import SEGMENT_CLASSES, SegmentClass, segment
from workers.domain import Analysis
from workers.write_dicom import codes
from workers.write_dicom.common import (
    SeriesInfo,
    algorithm_parameters,
    copy_patient_study,
    file_meta,
    lossy_history,
    referenced_series,
    series_laterality,
    set_series_and_equipment,
    source_image_item,
)
from workers.write_dicom.uids import derive_uid, frame_of_reference_uid

#: Weasis (4.x) does not display BINARY SEGs with more frames than this.
WEASIS_MAX_FRAMES = 400

_SEGMENT_NUMBER_TAG = 0x0062000B  # ReferencedSegmentNumber
_SEGMENT_ID_SEQ_TAG = 0x0062000A  # SegmentIdentificationSequence
_TEMPORAL_INDEX_TAG = 0x00209128  # TemporalPositionIndex
_FRAME_CONTENT_SEQ_TAG = 0x00209111  # FrameContentSequence


@dataclass(frozen=True)
class SegOptions:
    """``segmentation_type``: BINARY (one frame per segment and source frame, widest viewer
    support) or LABELMAP (Label Map Segmentation SOP class, one 8-bit frame per source frame).
    ``compress``: RLE Lossless (LABELMAP only; 1-bit frames are not RLE-coded by viewers).
    ``deflate``: Deflated Explicit VR Little Endian (either type): the whole object zlib-coded,
    which shrinks BINARY masks ~100-fold; read by DCMTK, pydicom/highdicom, dcm4che (Weasis) and
    dcmjs (OHIF), and re-encoded by the sender for a peer that does not accept it.
    ``max_frames``: subsample source frames evenly so the SEG has at most this many frames
    (e.g. :data:`WEASIS_MAX_FRAMES`); None keeps every source frame.
    """

    segmentation_type: Literal["BINARY", "LABELMAP"] = "BINARY"
    compress: bool = False
    deflate: bool = False
    max_frames: int | None = None
    device_serial_number: str | None = None


def selected_source_frames(n_frames: int, n_segments: int, max_frames: int | None) -> list[int]:
    """0-based source frames to segment, evenly strided to respect ``max_frames``."""
    if max_frames is None or n_frames * n_segments <= max_frames:
        return list(range(n_frames))
    if max_frames < n_segments:
        raise ValueError(f"max_frames={max_frames} cannot hold one frame of {n_segments} segments")
    per_segment = max_frames // n_segments
    return list(range(0, n_frames, math.ceil(n_frames / per_segment)))


_PACK_CHUNK = 64  # SEG frames per packing pass; a multiple of 8, so each pass ends on a byte


def pack_masks(labels: np.ndarray, frames: list[tuple[int, int]]) -> bytes:
    """1-bit pixel data of the (segment number, 0-based source frame) masks: frames back to back,
    least significant bit first, padded to even length only at the end (PS3.5 8.1.1, 8.2).

    Packed a few frames at a time, so a long cine never holds every mask as a boolean array."""
    rows, cols = labels.shape[1:]
    parts = []
    block = np.empty((min(_PACK_CHUNK, len(frames)), rows, cols), dtype=bool)
    for start in range(0, len(frames), _PACK_CHUNK):
        chunk = frames[start : start + _PACK_CHUNK]
        for j, (cls, f) in enumerate(chunk):
            np.equal(labels[f], cls, out=block[j])
        parts.append(np.packbits(block[: len(chunk)].ravel(), bitorder="little").tobytes())
    packed = b"".join(parts)
    return packed + b"\0" if len(packed) % 2 else packed


def segment_description(
    cls: SegmentClass, analysis: Analysis, sop_instance_uid: str, root: str, laterality: str | None = None
) -> Dataset:
    """Segment Sequence item (C.8.20.2): coded category/type, lung region (with the source's
    laterality as modifier), algorithm identification (C.8.20.3), recommended colour."""
    row = segment(cls)
    model = analysis.model
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model.name,
        family=codes.ARTIFICIAL_INTELLIGENCE,
        version=model.version,
        parameters=algorithm_parameters(model),
    )
    desc = hd.seg.SegmentDescription(
        segment_number=int(cls),
        segment_label=row.label,
        segmented_property_category=row.category,
        segmented_property_type=row.type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=derive_uid(root, sop_instance_uid, "segment", str(int(cls))),
        tracking_id=f"lusai {row.label}",
        anatomic_regions=[codes.LUNG],
        display_color=hd.color.CIELabColor.from_rgb(*row.rgb),
    )
    if laterality is not None:
        side = codes.RIGHT if laterality == "R" else codes.LEFT
        desc.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [hd.sr.CodedConcept.from_code(side)]
    return desc


def _frame_group(source: Dataset, source_frame: int, temporal_index: int, segment: int | None) -> Dataset:
    """Per-frame functional groups: Derivation Image, Frame Content, Segment Identification."""
    src = source_image_item(source, [source_frame + 1])
    src.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept("121322", "DCM", "Source image for image processing operation")
    ]
    src.SpatialLocationsPreserved = "YES"  # same pixel grid as the source (C.7.6.16.2.6.1)
    derivation = Dataset()
    derivation.DerivationCodeSequence = [hd.sr.CodedConcept("113076", "DCM", "Segmentation")]
    derivation.SourceImageSequence = [src]
    content = Dataset()
    content.TemporalPositionIndex = temporal_index
    dims = [temporal_index] if segment is None else [segment, temporal_index]
    content.DimensionIndexValues = dims
    group = Dataset()
    group.DerivationImageSequence = [derivation]
    group.FrameContentSequence = [content]
    if segment is not None:
        ident = Dataset()
        ident.ReferencedSegmentNumber = segment
        group.SegmentIdentificationSequence = [ident]
    return group


def _dimension_index(dim_uid: str, binary: bool) -> list[Dataset]:
    items: list[Dataset] = []
    if binary:
        seg = Dataset()
        seg.DimensionOrganizationUID = dim_uid
        seg.DimensionIndexPointer = _SEGMENT_NUMBER_TAG
        seg.FunctionalGroupPointer = _SEGMENT_ID_SEQ_TAG
        seg.DimensionDescriptionLabel = "Segment Number"
        items.append(seg)
    tpi = Dataset()
    tpi.DimensionOrganizationUID = dim_uid
    tpi.DimensionIndexPointer = _TEMPORAL_INDEX_TAG
    tpi.FunctionalGroupPointer = _FRAME_CONTENT_SEQ_TAG
    tpi.DimensionDescriptionLabel = "Temporal Position Index"
    items.append(tpi)
    return items


def _shared_groups(source: Dataset, ds: Dataset, root: str) -> Dataset:
    """Shared functional groups and Frame of Reference (C.7.4.1) for cornerstone3D's loader."""
    shared = Dataset()
    region = ultrasound_region(source)
    spacing = None if region is None else region.spacing_mm
    if spacing is None and "FrameOfReferenceUID" not in source:
        return shared
    ds.FrameOfReferenceUID = source.get("FrameOfReferenceUID") or frame_of_reference_uid(
        source.SOPInstanceUID, root
    )
    ds.PositionReferenceIndicator = source.get("PositionReferenceIndicator", "")
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = [orientation]
    if spacing is not None:
        measures = Dataset()
        measures.PixelSpacing = [f"{spacing[0]:.6g}", f"{spacing[1]:.6g}"]
        # Elevational beam thickness is unknown; highdicom needs a value to read the macro, so
        # record the nominal in-plane spacing (documented in docs/dicom-outputs.md).
        measures.SliceThickness = f"{min(spacing):.6g}"
        shared.PixelMeasuresSequence = [measures]
    return shared


def build_seg(
    source: Dataset,
    analysis: Analysis,
    series: SeriesInfo,
    *,
    options: SegOptions = SegOptions(),
    uid_root: str,
    now: dt.datetime,
) -> Dataset:
    """The SEG for ``analysis.labels`` on ``source`` (uncompressed BINARY by default)."""
    labels = np.asarray(analysis.labels)
    n_src = int(source.get("NumberOfFrames", 1) or 1)
    if labels.shape != (n_src, source.Rows, source.Columns):
        raise ValueError(
            f"labels {labels.shape} do not match source ({n_src}, {source.Rows}, {source.Columns})"
        )
    binary = options.segmentation_type == "BINARY"
    if options.compress and binary:
        raise ValueError("compression is only offered for LABELMAP segmentations")
    if options.compress and options.deflate:
        raise ValueError("RLE and deflate are two transfer syntaxes: choose one")

    presence = analysis.class_frames
    present = [c for c in SEGMENT_CLASSES if presence[:, int(c)].any()]
    frames = selected_source_frames(n_src, max(len(present), 1) if binary else 1, options.max_frames)

    ds = Dataset()
    copy_patient_study(source, ds)
    set_series_and_equipment(ds, source, series, analysis.model, "SEG", now=now, with_laterality=False)
    ds.SOPClassUID = SegmentationStorage if binary else LABEL_MAP_SEGMENTATION_STORAGE
    ds.DeviceSerialNumber = options.device_serial_number or analysis.model.weights_sha256[:16] or "unknown"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.ContentLabel = "LUSAI_SEG"
    ds.ContentDescription = f"Lung ultrasound segmentation by {analysis.model.name} {analysis.model.version}"
    ds.ContentCreatorName = None
    ds.SegmentationType = options.segmentation_type
    side = series_laterality(source)
    ds.SegmentSequence = [
        segment_description(c, analysis, series.sop_instance_uid, uid_root, side) for c in SEGMENT_CLASSES
    ]
    ds.SegmentsOverlap = "NO"
    ds.ReferencedSeriesSequence = referenced_series(source)
    if "PatientOrientation" in source:
        ds.PatientOrientation = list(source.PatientOrientation)

    dim_uid = derive_uid(uid_root, series.sop_instance_uid, "dimension-organization")
    org = Dataset()
    org.DimensionOrganizationUID = dim_uid
    ds.DimensionOrganizationSequence = [org]
    ds.DimensionIndexSequence = _dimension_index(dim_uid, binary)
    ds.SharedFunctionalGroupsSequence = [_shared_groups(source, ds, uid_root)]

    groups: list[Dataset] = []
    if binary:
        # (segment, temporal position, source frame) of every SEG frame: a segment only where it
        # has pixels; an all-background cine keeps one empty frame per segment (never no frame).
        items = [
            (int(c), t, f) for c in present for t, f in enumerate(frames, start=1) if presence[f, int(c)]
        ]
        items = items or [(int(c), 1, frames[0]) for c in SEGMENT_CLASSES]
        groups = [_frame_group(source, f, t, cls) for cls, t, f in items]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
        ds.PixelData = pack_masks(labels, [(cls, f) for cls, _, f in items])
    else:
        groups = [_frame_group(source, f, t, None) for t, f in enumerate(frames, start=1)]
        pixels = labels[frames].astype(np.uint8)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = pixels.tobytes()
    ds.PerFrameFunctionalGroupsSequence = Sequence(groups)
    ds.NumberOfFrames = len(groups)
    ds.Rows, ds.Columns = int(source.Rows), int(source.Columns)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0
    lossy_history(source, ds)
    codes.declare_private_scheme(ds)

    syntax = DeflatedExplicitVRLittleEndian if options.deflate else ExplicitVRLittleEndian
    ds.file_meta = file_meta(ds.SOPClassUID, ds.SOPInstanceUID, syntax)
    if options.compress:
        ds.compress(RLELossless, pixels, generate_instance_uid=False)
    return ds
