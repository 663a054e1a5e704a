"""Viewer profiles: what lusai writes for a destination, chosen by the viewer that will show it.

No single encoding displays right everywhere (issue 14, measured in OHIF 3.13.2 and read in the
sources of Weasis, Slicer/dcmqi and Orthanc): OHIF's SEG loader misreads every BINARY frame that
does not start on a byte boundary, a PACS older than Supplement 243 refuses the Label Map
Segmentation SOP class, Slicer cannot place a SEG on a cine without patient geometry, and released
Weasis does not map SEG frames to the frames of a multi-frame ultrasound image. A profile bundles
the three choices that follow from that: the SEG encoding, the SR shape and the burned-in overlay.
``docs/dicom-outputs.md`` ("Viewers") says per viewer what is shown and how it was verified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SegEncoding = Literal["auto", "binary-deflated", "binary", "labelmap-deflated", "labelmap-rle", "labelmap"]
"""``auto``: BINARY (deflated) when every 1-bit frame starts on a byte boundary and the pixel data
needs no pad byte (rows x columns a multiple of 16), else LABELMAP (deflated): the one choice both
OHIF <= 3.13 decodes exactly and every PACS stores wherever BINARY is safe."""

SrShape = Literal["viewer", "full"]
"""``viewer``: TID 1500 whose every measurement group carries an image region, so OHIF <= 3.13
(which dereferences a group's first coordinate unguarded) opens it; the same content as ``full``
for a machine reader. ``full``: the plain TID 1500 (findings groups without coordinates), for
archives and SR readers that are not viewers."""


@dataclass(frozen=True)
class ViewerProfile:
    """What one destination is sent."""

    seg_encoding: SegEncoding
    sr_shape: SrShape
    overlay_sc: bool
    summary: str = ""


PROFILES: dict[str, ViewerProfile] = {
    "ohif": ViewerProfile(
        "auto",
        "viewer",
        False,
        "OHIF 3.x from a DICOMweb PACS: SEG decoded exactly (verified pixel by pixel in a real browser)",
    ),
    "archive": ViewerProfile(
        "binary-deflated",
        "full",
        False,
        "a PACS that stores SEG/SR without showing them: only SOP classes every PACS knows",
    ),
    "weasis": ViewerProfile(
        "binary-deflated",
        "viewer",
        True,
        "Weasis 4.x: the burned-in overlay shows the masks (released Weasis maps SEG frames by SOP"
        " instance only); the SR is shown as text, its key-frame region drawn on the frame",
    ),
    "slicer": ViewerProfile(
        "binary",
        "full",
        True,
        "3D Slicer: dcmqi needs per-frame patient positions, which ultrasound cines lack; the"
        " overlay shows the masks, the SEG is kept uncompressed for tools that read it",
    ),
    "burned-in": ViewerProfile(
        "binary-deflated",
        "viewer",
        True,
        "any viewer without SEG support: the overlay Secondary Capture as well",
    ),
}
"""The built-in profiles; ``LUSAI_DESTINATION_PROFILES`` names one per destination."""
