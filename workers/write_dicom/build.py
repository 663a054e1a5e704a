"""Single entry point the worker calls: source + analysis -> validated SEG, SR and overlay SC."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import PYDICOM_ROOT_UID

from service.core.dicom import OUTPUT_SOP_CLASSES, OutputKind
from service.core.profiles import SegEncoding, SrShape
from workers.domain import Analysis
from workers.write_dicom.common import SeriesInfo
from workers.write_dicom.overlay import OverlayOptions, build_overlay
from workers.write_dicom.seg import SegOptions, build_seg
from workers.write_dicom.sr import build_sr
from workers.write_dicom.uids import output_uids
from workers.write_dicom.validate import validate_outputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Output:
    """One written object with its kind, so no caller has to classify a dataset again."""

    kind: OutputKind
    dataset: Dataset

    def __post_init__(self) -> None:
        if self.dataset.SOPClassUID not in OUTPUT_SOP_CLASSES[self.kind]:
            raise ValueError(f"a {self.kind} output cannot have SOP class {self.dataset.SOPClassUID}")


@dataclass(frozen=True)
class OutputOptions:
    """What to write. ``seg``/``overlay`` None skips that object; the overlay also needs frames.

    ``uid_root``: org root for the deterministic UIDs (pydicom's until the site registers one).
    ``sr_shape``: see :data:`service.core.profiles.SrShape`.
    ``validate``: run dciodvfy/dcentvfy/re-read and raise on errors (missing tools raise too).
    """

    uid_root: str = PYDICOM_ROOT_UID
    seg: SegOptions | None = field(default_factory=SegOptions)
    sr: bool = True
    sr_shape: SrShape = "viewer"
    overlay: OverlayOptions | None = field(default_factory=OverlayOptions)
    series_numbers: dict[OutputKind, int] = field(
        default_factory=lambda: {OutputKind.SEG: 9101, OutputKind.SR: 9102, OutputKind.SC: 9103}
    )
    series_descriptions: dict[OutputKind, str] = field(
        default_factory=lambda: {
            OutputKind.SEG: "LUSAI SEG",
            OutputKind.SR: "LUSAI SR",
            OutputKind.SC: "LUSAI overlay",
        }
    )
    validate: bool = True


SEG_ENCODINGS: dict[str, SegOptions] = {
    "binary-deflated": SegOptions(deflate=True),
    "binary": SegOptions(),
    "labelmap-deflated": SegOptions(segmentation_type="LABELMAP", deflate=True),
    "labelmap-rle": SegOptions(segmentation_type="LABELMAP", compress=True),
    "labelmap": SegOptions(segmentation_type="LABELMAP"),
}
"""``LUSAI_SEG_ENCODING`` values but ``auto`` (:func:`seg_options`)."""


def seg_options(encoding: SegEncoding, rows: int, columns: int) -> SegOptions:
    """The SEG options of an encoding name; ``auto`` picks BINARY only where OHIF <= 3.13 reads it.

    That reader takes frame *k* of a BINARY SEG from byte ``k * rows * columns / 8`` and unpacks it
    from bit 0, so a frame that starts mid-byte comes out shifted (10,000-13,000 wrong pixels per
    frame on a 350 x 350 cine), and it refuses pixel data whose length carries the pad byte of
    an odd byte count. Both are impossible when rows x columns is a multiple of 16.
    """
    if encoding == "auto":
        encoding = "binary-deflated" if (rows * columns) % 16 == 0 else "labelmap-deflated"
    return SEG_ENCODINGS[encoding]


def series_info(source: Dataset, analysis: Analysis, kind: OutputKind, options: OutputOptions) -> SeriesInfo:
    uids = output_uids(source.SOPInstanceUID, analysis.model, kind, options.uid_root, _variant(kind, options))
    return SeriesInfo(
        series_instance_uid=uids.series_instance_uid,
        sop_instance_uid=uids.sop_instance_uid,
        series_number=options.series_numbers[kind],
        series_description=options.series_descriptions[kind],
    )


def _variant(kind: OutputKind, options: OutputOptions) -> str:
    if kind == OutputKind.SEG and options.seg is not None and options.seg.segmentation_type == "LABELMAP":
        return "labelmap"
    if kind == OutputKind.SR and options.sr_shape != "full":
        return options.sr_shape
    return ""


def build_outputs(
    source: Dataset,
    analysis: Analysis,
    *,
    frames_rgb: np.ndarray | None = None,
    options: OutputOptions = OutputOptions(),
    now: dt.datetime | None = None,
) -> list[Output]:
    """SEG, SR and (given decoded ``frames_rgb``) overlay SC for one analysed cine, validated.

    ``source`` may be a metadata-only dataset (pixel data is never read here).
    """
    if analysis.sop_instance_uid != source.SOPInstanceUID:
        raise ValueError("analysis does not belong to this source instance")
    now = now or dt.datetime.now()
    outputs: list[Output] = []
    seg = None
    if options.seg is not None:
        seg = build_seg(
            source,
            analysis,
            series_info(source, analysis, OutputKind.SEG, options),
            options=options.seg,
            uid_root=options.uid_root,
            now=now,
        )
        outputs.append(Output(OutputKind.SEG, seg))
    if options.sr:
        info = series_info(source, analysis, OutputKind.SR, options)
        sr = build_sr(
            source, analysis, info, seg=seg, uid_root=options.uid_root, now=now, shape=options.sr_shape
        )
        outputs.append(Output(OutputKind.SR, sr))
    if options.overlay is not None and frames_rgb is not None:
        info = series_info(source, analysis, OutputKind.SC, options)
        sc = build_overlay(source, analysis, frames_rgb, info, options=options.overlay, now=now)
        outputs.append(Output(OutputKind.SC, sc))
    if options.validate and outputs:
        validate_outputs(source, [o.dataset for o in outputs])
    log.info(
        "built %d DICOM output(s) with model %s %s", len(outputs), analysis.model.name, analysis.model.version
    )
    return outputs
