"""``python -m sidecar`` is ``quota-sidecar``."""

from sidecar.cli import main

raise SystemExit(main())
