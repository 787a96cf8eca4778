import sys

from slidefm.cli import main

sys.exit(main())
