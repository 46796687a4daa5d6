"""``python -m benchmarks [--smoke] [--out DIR] ...``: the whole suite."""

import sys

from .suite import main

sys.exit(main())
