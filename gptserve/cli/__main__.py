import sys

from gptserve.cli import main

sys.exit(main())
