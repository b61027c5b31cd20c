import sys

from transfer_ensemble.cli import main

sys.exit(main())
