"""`python -m hetmerge` (what the Snakemake rules run, so they need no installed entry point).

A light client: the job runs in a forked child of a warm server that has imported torch already, or
in-process where that is off or impossible (see hetmerge.worker). This module must not import torch.
"""

import sys

from hetmerge.worker import run

raise SystemExit(run(sys.argv[1:]))
