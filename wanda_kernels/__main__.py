"""``python -m wanda_kernels``: the ``wanda-kernels`` command."""

import sys

from .llm.cli import main

sys.exit(main())
