"""``python -m megatron_helix.layerwise``: print a plan (see ``cli.main``)."""

import sys

from megatron_helix.layerwise.cli import main

if __name__ == "__main__":
    sys.exit(main())
