import sys

from konstruct.app.cli import main

sys.exit(main())
