"""`python -m amft_lib.cli` ≡ `amft`."""

import sys

from amft_lib.cli import main

sys.exit(main())
