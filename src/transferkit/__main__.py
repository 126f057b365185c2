"""`python -m transferkit`: the command line (see `transferkit.cli`)."""

from transferkit.cli import main

raise SystemExit(main())
