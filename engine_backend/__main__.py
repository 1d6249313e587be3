"""``python -m engine_backend``: the self-check (see ``cli``)."""

from .cli import main

raise SystemExit(main())
