import sys

from coe.tools.cli import main

sys.exit(main())
