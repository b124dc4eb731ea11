"""``python -m eagerloco`` is the ``eagerloco`` command."""

import sys

from eagerloco.cli.main import main

sys.exit(main())
