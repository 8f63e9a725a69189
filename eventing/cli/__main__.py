"""`python -m eventing.cli`: how `sluice up` and the tests start the CLI's commands."""

import sys

from eventing.cli import main

sys.exit(main())
