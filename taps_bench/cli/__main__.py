"""`python -m taps_bench.cli`: the same as the `taps-bench` script."""

import sys

from taps_bench.cli import main

sys.exit(main())
