"""``python -m vmferry.cli``: the ``vmferry`` command."""

import sys

from .main import main

sys.exit(main())
