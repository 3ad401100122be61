"""Allow ``python -m CMBDetectLib``."""

import sys

from CMBDetectLib.cli import main

sys.exit(main())
