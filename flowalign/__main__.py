"""``python -m flowalign`` (and ``accelerate launch -m flowalign``) runs the CLI."""

import sys

from flowalign.cli import main

sys.exit(main())
