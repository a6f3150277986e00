import sys

from lemix.cli import main

sys.exit(main())
