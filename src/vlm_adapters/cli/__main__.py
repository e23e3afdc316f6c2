"""``python -m vlm_adapters.cli``: the ``vlm-adapters`` command."""

from vlm_adapters.cli import main

raise SystemExit(main())
