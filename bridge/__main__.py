"""`python -m bridge` runs the `luma-kafka-bridge` command."""

import sys

from bridge.cli import main

sys.exit(main())
