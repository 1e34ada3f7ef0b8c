import sys

from dgm.cli import main

sys.exit(main())
