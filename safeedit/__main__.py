import sys

from safeedit.cli import main

sys.exit(main())
