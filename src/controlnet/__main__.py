"""``python -m controlnet`` (used by ``accelerate launch -m controlnet train ...``)."""

import sys

from controlnet.cli import main

sys.exit(main())
