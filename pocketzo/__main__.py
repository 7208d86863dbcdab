import sys

from pocketzo.cli import main

sys.exit(main())
