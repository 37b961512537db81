"""backupmx: a backup MX that queues mail per domain and hands it to the
domain's configured primary when the primary asks with ETRN."""

__version__ = "0.1.0"
