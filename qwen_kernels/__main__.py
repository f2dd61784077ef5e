"""``python -m qwen_kernels`` is the ``qwen-kernels`` command."""

import sys

from .cli import main

sys.exit(main())
