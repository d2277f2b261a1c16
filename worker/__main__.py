"""``python -m worker`` is the ``sealstream`` command."""

import sys

from worker.cli import main

sys.exit(main())
