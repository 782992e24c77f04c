import sys

from konstruct.cli import main

sys.exit(main())
