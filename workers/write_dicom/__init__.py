"""SEG, SR and Secondary Capture outputs of a lung-ultrasound analysis (see docs/dicom-outputs.md)."""

from workers.write_dicom.build import Output, OutputOptions, build_outputs
from workers.write_dicom.overlay import OverlayOptions
from workers.write_dicom.seg import WEASIS_MAX_FRAMES, SegOptions
from workers.write_dicom.validate import OutputValidationError, ValidationResult, ValidatorNotFoundError

__all__ = [
    "WEASIS_MAX_FRAMES",
    "Output",
    "OutputOptions",
    "OutputValidationError",
    "OverlayOptions",
    "SegOptions",
    "ValidationResult",
    "ValidatorNotFoundError",
    "build_outputs",
]
