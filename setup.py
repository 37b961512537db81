"""Packaging for backupmx. No runtime dependencies: the standard library is enough."""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py


class build_py_with_schema(build_py):
    """Ship schema.sql inside the package, where backupmx.schema looks for it."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "backupmx", "schema.sql")
        shutil.copyfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), "schema.sql"), target)


setup(
    name="backupmx",
    version="0.1.0",
    description="A backup MX that queues mail per domain in SQLite and delivers it to the primary on ETRN",
    packages=["backupmx"],
    python_requires=">=3.11",
    cmdclass={"build_py": build_py_with_schema},
    entry_points={"console_scripts": ["backupmx = backupmx.cli:main"]},
)
