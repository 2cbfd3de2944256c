import sys

from feddmmr.cli import main

sys.exit(main())
