"""`python -m star_server`: the language server (same options as `star serve`)."""

import sys

from .cli import main

sys.exit(main())
