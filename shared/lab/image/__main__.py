"""python3 -m shared.lab.image: see cli.py."""

import sys

from shared.lab.image.cli import main

sys.exit(main())
