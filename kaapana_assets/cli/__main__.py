"""`python -m kaapana_assets.cli`: the `kaapana` command (tests and benchmarks start it so)."""

import sys

from kaapana_assets.cli import main

if __name__ == "__main__":
    sys.exit(main())
