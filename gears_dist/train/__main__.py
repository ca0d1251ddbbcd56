"""``python -m gears_dist.train --config C STORE --out DIR``: the per-worker loop in one process, no Ray.

Used by tests and by the single-GPU benchmark; ``gears-dist train`` (Ray) is the user-facing command. The
arguments are declared in `gears_dist.cli.train_single_main`.
"""

from __future__ import annotations

import sys

from gears_dist.cli import train_single_main

if __name__ == "__main__":
    sys.exit(train_single_main())
