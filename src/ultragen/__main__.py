import sys

from ultragen.cli import main

sys.exit(main())
