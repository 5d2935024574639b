"""``python -m myxd.cli``: the same as the ``myx`` script."""

import sys

from myxd.cli import main

sys.exit(main())
