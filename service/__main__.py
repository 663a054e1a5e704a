"""``python -m service`` is ``lusai``."""

from service.cli import main

main()
