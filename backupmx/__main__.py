"""`python3 -m backupmx ...` and the zipapp bundle start here."""
import sys

from backupmx.cli import main

sys.exit(main())
