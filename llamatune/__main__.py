"""``python -m llamatune`` runs the CLI."""

from llamatune.cli import main

raise SystemExit(main())
