"""Deliver stage: send stored output objects to DICOM destinations."""

from workers.deliver.outbox import send_delivery

__all__ = ["send_delivery"]
