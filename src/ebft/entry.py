"""The ``ebft`` command (console script and ``python -m ebft``): the process environment that must be set
before torch loads, then ``ebft.cli``.

libgomp reads ``OMP_WAIT_POLICY`` once, when torch loads it. Its default, busy-waiting, makes torch 10-30x
slower when other processes share the cores; ``ebft quickstart`` targets a small, possibly shared CPU
machine, so it waits passively (which costs little on idle cores). Nothing here imports torch.
"""

from __future__ import annotations

import os
import sys


def entrypoint() -> None:
    if sys.argv[1:2] == ["quickstart"]:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from ebft.cli import main

    sys.exit(main())
