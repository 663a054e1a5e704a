"""Regenerate the README's configuration table from :class:`service.core.settings.Settings`.

Usage: python tools/settings_table.py  (rewrites the block between the settings-table markers)
"""

from __future__ import annotations

import re
from pathlib import Path

from service.core.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def table() -> str:
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
        if isinstance(default, list):
            shown = ",".join(default) or "(empty)"
        elif isinstance(default, dict) or default is None or default == "":
            shown = "(empty)"
        else:
            shown = str(default)
        desc = (field.description or "").replace("|", "\\|")
        shown = shown.replace("|", "\\|")
        rows.append(f"| `LUSAI_{name.upper()}` | `{shown}` | {desc} |")
    return "\n".join(rows)


def main() -> None:
    text = README.read_text()
    new = re.sub(
        r"(<!-- settings-table:start -->\n).*?(<!-- settings-table:end -->)",
        lambda m: m.group(1) + table() + "\n" + m.group(2),
        text,
        flags=re.S,
    )
    README.write_text(new)


if __name__ == "__main__":
    main()
