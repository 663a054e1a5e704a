"""DICOM pixels -> grayscale frames -> imaging sector -> the model's polar working grid."""

from workers.preprocess.decode import decode_frames, frame_rate
from workers.preprocess.errors import InputError
from workers.preprocess.grid import Grid, GridShape
from workers.preprocess.sector import Sector, detect_sector

__all__ = ["Grid", "GridShape", "InputError", "Sector", "decode_frames", "detect_sector", "frame_rate"]
