"""The layout docs/ARCHITECTURE.md describes: dependencies point inward, and code stays in small pieces."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "backupmx"

# docs/ARCHITECTURE.md, "Modules". A module may import from its own layer and the ones below it.
LAYERS = {
    "protocol": {"smtp", "smtp_body", "smtp_events", "smtp_arguments", "smtp_counts", "trace_header", "addresses", "envelope",
                 "replies", "auth", "scram", "idn", "outcome", "clients", "odmr"},
    "queue": {"store", "store_db", "store_errors", "store_ids", "store_bodies", "store_migrations",
              "store_intake", "store_flushes", "store_delivery", "store_housekeeping", "store_operator",
              "store_status", "store_verify", "store_auth", "store_greylist", "store_probes", "schema"},
    "driver": {"connection", "connection_context", "connection_messages", "connection_auth", "client_socket",
               "offload", "quota", "tls", "smtpclient", "primaries", "metrics", "health",
               "policy", "verify", "auth_limit", "client_dns",
               "odmr_connection", "greylist", "atrn_relay", "prober"},
    "process": {"master", "listeners", "startup", "worker", "inetd", "children", "flusher", "flush_session", "flush_lease",
                "flush_sharing", "lifecycle", "reclaim", "dsn",
                "notify", "metrics_http", "flush_workers", "odmr_sessions", "checkpointer", "helper_processes",
                "primary_lookups", "smtp_workers", "client_counts"},
}
# Leaves anyone may use: the config's data model (with its value parsers and its AUTH
# warnings), the log line format.
SHARED = {"config", "config_values", "config_auth", "log"}
BELOW = {
    "protocol": set(),
    "queue": {"protocol"},
    "driver": {"protocol", "queue"},
    "process": {"protocol", "queue", "driver"},
}


def imports_of(path: Path, annotations: bool = True) -> set[str]:
    """The backupmx modules `path` imports; with annotations=False, not those imported under
    `if TYPE_CHECKING:` (for annotations only, never at run time)."""
    tree = ast.parse(path.read_text())
    if not annotations:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "backupmx":
                found |= {alias.name for alias in node.names}
            elif node.module.startswith("backupmx."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("backupmx.")}
    return found


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_dependencies_point_inward(layer):
    allowed = set().union(LAYERS[layer], SHARED, *(LAYERS[below] for below in BELOW[layer]))
    wrong = {module: sorted(imports_of(PACKAGE / f"{module}.py") - allowed) for module in LAYERS[layer]}
    assert not {module: deps for module, deps in wrong.items() if deps}


def test_the_shared_leaves_stand_on_the_protocol_layer_only():
    """config (config_values, config_auth) and log are imported by every layer, so what they import
    is imported by every layer too."""
    allowed = SHARED | LAYERS["protocol"]
    assert {module: sorted(imports_of(PACKAGE / f"{module}.py") - allowed) for module in SHARED} == \
        {module: [] for module in SHARED}


def test_no_module_imports_one_that_imports_it_back():
    """Within a layer any module may import any other, so the layers alone let the parts of a
    split (flush_session, smtp_workers, config_values...) import their whole again: no cycle,
    counting the imports inside functions (a cycle put off is still one), not the annotations'."""
    graph = {p.stem: imports_of(p, annotations=False) for p in PACKAGE.glob("*.py")}

    def cycle_from(start):
        path, seen = [start], set()

        def walk(module):
            for nxt in sorted(graph.get(module, ())):
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    path.append(nxt)
                    found = walk(nxt)
                    if found:
                        return found
                    path.pop()
            return None
        return walk(start)

    assert [cycle for cycle in map(cycle_from, sorted(graph)) if cycle] == []


def test_every_module_has_a_place():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__", "cli", "cli_check", "cli_common", "cli_queue",
                                                          "etrnclient", "atrnclient"}
    placed = set().union(SHARED, *LAYERS.values())
    assert modules == placed, "add the new module to LAYERS (and to docs/ARCHITECTURE.md)"


def test_no_class_over_500_lines_no_function_over_90():
    too_long = []
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            limit = 500 if isinstance(node, ast.ClassDef) else 90
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.end_lineno - node.lineno + 1 > limit:
                too_long.append(f"{path.stem}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long
