"""`python -m capsem_vm`: the `capsem` command, from any directory."""

import sys

from capsem_vm.cli import main

sys.exit(main())
