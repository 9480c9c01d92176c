"""``python -m minference_hf`` runs the ``minference`` command."""

import sys

from .cli import main

sys.exit(main())
