"""Find and read schema.sql, the single source of the queue schema.

It lives in three places depending on how backupmx runs:
  - installed package or zipapp bundle: inside the package, next to this file
    (setup.py's build_py and `backupmx bundle` copy it there);
  - a checkout: at the top level of the repository, one directory up.

Besides running its statements, store_db.py reads two things from its text:
the schema version (`PRAGMA user_version = N;`) and the views it defines
(the only ones a migration drops).
"""

import importlib.resources
import re
from pathlib import Path

_VERSION_RE = re.compile(r"^\s*PRAGMA\s+user_version\s*=\s*(\d+)\s*;", re.IGNORECASE | re.MULTILINE)
_VIEW_RE = re.compile(r"^\s*CREATE\s+VIEW\s+IF\s+NOT\s+EXISTS\s+(\w+)", re.IGNORECASE | re.MULTILINE)


class SchemaNotFound(RuntimeError):
    """Neither the packaged nor the checkout copy of schema.sql exists."""


def schema_text() -> str:
    """Return the text of schema.sql."""
    try:
        resource = importlib.resources.files("backupmx") / "schema.sql"
        if resource.is_file():
            return resource.read_text(encoding="utf-8")
    except (OSError, ModuleNotFoundError):  # not a real directory / odd loader: try the checkout
        pass
    checkout = Path(__file__).resolve().parent.parent / "schema.sql"
    try:
        return checkout.read_text(encoding="utf-8")
    except OSError as exc:
        raise SchemaNotFound(f"schema.sql not found in the backupmx package nor at {checkout}: {exc}") from None


def schema_version(text: str | None = None) -> int:
    """The schema version: the `PRAGMA user_version = N;` line of schema.sql."""
    match = _VERSION_RE.search(schema_text() if text is None else text)
    if match is None:
        raise SchemaNotFound("schema.sql has no 'PRAGMA user_version = N;' line")
    return int(match.group(1))


def view_names(text: str) -> list[str]:
    """The views schema.sql creates (a migration drops these, and only these, to create them anew)."""
    return _VIEW_RE.findall(text)
