"""``python -m datagen.cli``: the datagen command."""

import sys

from datagen.cli import main

sys.exit(main())
