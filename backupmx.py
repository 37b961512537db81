#!/usr/bin/env python3
"""Launcher: `python3 backupmx.py ...` behaves exactly like the installed `backupmx ...`."""
import sys

from backupmx.cli import main

if __name__ == "__main__":
    sys.exit(main())
