"""Write the OpenAPI document committed as ``docs/openapi.json``: ``python -m service.api.openapi``.

The spec is generated from the code; a test fails when the committed copy is out of date, so
integrators can diff API versions in review rather than discover changes in production.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from service.core.runtime import Runtime
from service.core.settings import Settings

OUTPUT = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def spec() -> dict[str, Any]:
    """The spec of an app on default settings (nothing in it depends on the environment)."""
    from service.api.main import create_app

    with tempfile.TemporaryDirectory() as tmp, Runtime.from_settings(Settings(data_dir=Path(tmp))) as runtime:
        return create_app(runtime).openapi()


def render() -> str:
    return json.dumps(spec(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> None:
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else OUTPUT
    target.write_text(render())
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
