import sys

from maxllama.cli import main

sys.exit(main())
