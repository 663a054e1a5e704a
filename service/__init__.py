"""lusai: lung-ultrasound inference service (DICOM SCP, queue, API)."""

__version__ = "0.1.0"
