from __future__ import annotations

import sys

from disaggd.cli import main

sys.exit(main())
