"""`python -m clipengine` runs the CLI."""

from __future__ import annotations

import sys

from .cli.app import main

sys.exit(main())
