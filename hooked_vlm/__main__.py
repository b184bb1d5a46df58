"""`python -m hooked_vlm ...`: the same as the `hooked-vlm` command."""

import sys

from hooked_vlm.cli import main

sys.exit(main())
