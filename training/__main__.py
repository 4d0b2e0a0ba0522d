"""``python -m training`` = ``zeroshot-ild-train``."""
import sys

from .cli import main

sys.exit(main())
