"""Which received objects are lung ultrasound and get analysed; the rest are stored and ignored."""

from __future__ import annotations

import re
from dataclasses import dataclass

from service.core.dicom import US_SOP_CLASSES
from service.core.header import Header


@dataclass(frozen=True)
class RoutingRules:
    """Case-insensitive regexes; an empty pattern matches anything (including a missing value)."""

    body_part: str = r""
    description: str = r""
    calling_ae: str = r""

    def decide(self, header: Header, calling_ae: str | None) -> str | None:
        """None to analyse, or the (PHI-free) reason the object is ignored."""
        if header.sop_class_uid not in US_SOP_CLASSES:
            return "not an ultrasound image SOP class"
        if (header.modality or "").upper() != "US":
            return "modality is not US"
        if self.body_part and not re.search(self.body_part, header.body_part or "", re.I):
            return "body part does not match the routing rule"
        desc = " ".join(filter(None, [header.study_description, header.series_description]))
        if self.description and not re.search(self.description, desc, re.I):
            return "description does not match the routing rule"
        if self.calling_ae and not re.search(self.calling_ae, calling_ae or "", re.I):
            return "calling AE does not match the routing rule"
        return None
