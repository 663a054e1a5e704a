"""Lung zones from series descriptions, and the study-level score built on them.

BLUS/BLUE-protocol cines are labelled per zone in the Series Description ("LUS R1" .. "LUS L3").
``LUSAI_ZONE_MAP`` (exact descriptions, case-insensitive) wins over ``LUSAI_ZONE_PATTERN`` (a
regex with groups ``side`` and ``number``), so sites with their own naming need no code change.
"""

from __future__ import annotations

import re

from service.core.settings import Settings


class ZoneRule:
    def __init__(self, pattern: str, mapping: dict[str, str]) -> None:
        self.regex = re.compile(pattern)
        if not {"side", "number"} <= set(self.regex.groupindex):
            raise ValueError("LUSAI_ZONE_PATTERN needs the named groups 'side' and 'number'")
        self.mapping = {k.strip().upper(): v.strip().upper() for k, v in mapping.items()}

    @classmethod
    def from_settings(cls, settings: Settings) -> ZoneRule:
        return cls(settings.zone_pattern, settings.zone_map)

    def zone(self, description: str | None) -> str | None:
        if not description:
            return None
        mapped = self.mapping.get(description.strip().upper())
        if mapped:
            return mapped
        m = self.regex.search(description)
        if m is None:
            return None
        return f"{m.group('side').upper()}{m.group('number')}"
