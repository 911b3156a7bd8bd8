"""``python -m lisa_control`` and ``accelerate launch -m lisa_control train ...``."""

import sys

from .cli import main

sys.exit(main())
