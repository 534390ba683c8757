"""`python -m hetmerge` (what the Snakemake rules run, so they need no installed entry point)."""

from hetmerge.cli import main

raise SystemExit(main())
