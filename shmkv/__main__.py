"""``python -m shmkv`` runs shmkv-inspect."""

import sys

from .cli import main

sys.exit(main())
