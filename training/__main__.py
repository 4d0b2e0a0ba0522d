"""``python -m zeroshot_ild_train`` = ``zeroshot-ild-train``."""
import sys

from .cli import main

sys.exit(main())
