"""Deliver stage: send stored output objects to DICOM destinations."""

from workers.deliver.outbox import probe_destinations, send_delivery

__all__ = ["probe_destinations", "send_delivery"]
