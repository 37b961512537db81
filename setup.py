"""Build hook only; the metadata is in pyproject.toml.

schema.sql has one home, the top of the checkout (docs/SPEC.md, "Repository
layout"), where humans and `sqlite3` read it. The built package needs a copy inside it, where
backupmx.schema, `backupmx bundle` and an installed `backupmx serve` find it;
setuptools' package-data only takes files inside the package, hence this hook.
"""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class build_py_with_schema(build_py):
    """Copy the top-level schema.sql into the built backupmx package."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "backupmx", "schema.sql")
        shutil.copyfile(os.path.join(HERE, "schema.sql"), target)


setup(cmdclass={"build_py": build_py_with_schema})
