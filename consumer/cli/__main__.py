"""`python -m consumer.cli …` runs the `opstream` command."""

import sys

from consumer.cli.main import main

sys.exit(main())
