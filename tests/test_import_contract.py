"""The layering holds: every import in server/ and client/ follows the import contract.

Read from the source with :mod:`ast` (nothing is imported), as trio checks its ``_core``
boundary. Within ``writewatchd`` a module imports only from its own layer or a lower one::

    _exceptions, _units, the package itself  <  kernel  <  tracking  <  service  <  cli, demo_writer

(the package's ``__init__`` holds the exceptions and the version, so it sits at the bottom).

``kernel`` and ``tracking`` import no gRPC and no protobuf. ``writewatch`` (the client)
imports nothing of ``writewatchd``. ``writewatchd`` takes from the client only the wire: the
generated ``writewatch._proto`` and the region codec ``writewatch.regions``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "server" / "writewatchd"
CLIENT = ROOT / "client" / "writewatch"

#: Rank of each layer of writewatchd; a module may import from its own rank or a lower one.
LAYERS = {"_exceptions": 0, "_units": 0, "kernel": 1, "tracking": 2, "service": 3}
TOP = 4
#: What the server may take from the client package: the wire only.
CLIENT_WIRE = ("writewatch._proto", "writewatch.regions")
#: Modules that talk gRPC or protobuf, which the kernel and tracking layers must not import.
TRANSPORT = ("grpc", "grpc_health", "grpc_reflection", "google.protobuf", "writewatch._proto")


@dataclass(frozen=True, slots=True)
class Import:
    """One import statement's target, as an absolute dotted module name."""

    importer: str
    target: str
    line: int


def _module_name(path: Path, package_root: Path) -> str:
    parts = list(path.relative_to(package_root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    """Whether ``dotted`` names a module or package of server/ or client/ (not an attribute)."""
    for root in (SERVER.parent, CLIENT.parent):
        base = root.joinpath(*dotted.split("."))
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return True
    return False


def imports_of(source: str, module: str, *, is_package: bool) -> list[Import]:
    """Every module that ``source`` (the text of ``module``) imports, wherever the statement is."""
    found = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend(Import(module, alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append(Import(module, candidate if _is_module(candidate) else base, node.lineno))
    return found


def _all_imports(package_root: Path) -> list[Import]:
    found = []
    for path in sorted(package_root.rglob("*.py")):
        if "_proto" in path.parts:
            continue
        module = _module_name(path, package_root)
        found.extend(imports_of(path.read_text(), module, is_package=path.name == "__init__.py"))
    return found


def _rank(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], TOP) if len(parts) > 1 else LAYERS["_exceptions"]


def _within(target: str, prefixes: tuple[str, ...]) -> bool:
    return any(target == prefix or target.startswith(prefix + ".") for prefix in prefixes)


def layering_violations(imports: list[Import]) -> list[str]:
    """Imports within writewatchd that go upward, and transport imports below the service."""
    bad = []
    for found in imports:
        if not found.importer.startswith("writewatchd"):
            continue
        if _within(found.target, ("writewatchd",)) and _rank(found.target) > _rank(found.importer):
            bad.append(f"{found.importer}:{found.line} imports {found.target} (upward)")
        if _rank(found.importer) < LAYERS["service"] and _within(found.target, TRANSPORT):
            bad.append(f"{found.importer}:{found.line} imports {found.target} (transport below the service)")
    return bad


def client_imports(imports: list[Import]) -> set[tuple[str, str]]:
    """(importer, target) for every import of the client package that is not the wire."""
    return {
        (found.importer, found.target)
        for found in imports
        if _within(found.target, ("writewatch",)) and not _within(found.target, CLIENT_WIRE)
    }


def test_the_server_layers_import_only_downward() -> None:
    imports = _all_imports(SERVER)
    assert len(imports) > 100, "the walk found too few imports to mean anything"
    assert layering_violations(imports) == []


def test_the_server_takes_only_the_wire_from_the_client() -> None:
    assert client_imports(_all_imports(SERVER)) == set()


def test_the_client_imports_nothing_of_the_server() -> None:
    imports = _all_imports(CLIENT)
    assert len(imports) > 20, "the walk found too few imports to mean anything"
    assert [f"{i.importer}:{i.line} imports {i.target}" for i in imports if _within(i.target, ("writewatchd",))] == []


@pytest.mark.parametrize(
    ("module", "is_package", "source", "expected", "n_violations"),
    [
        ("writewatchd.kernel.uffd", False, "from ..tracking import Tracker\n", ["writewatchd.tracking"], 1),
        ("writewatchd.kernel.uffd", False, "def f():\n    from ..service import hub\n", ["writewatchd.service.hub"], 1),
        ("writewatchd.tracking", True, "from . import views\nimport grpc\n", ["grpc", "writewatchd.tracking.views"], 1),
        ("writewatchd.tracking.regions", False, "from writewatch._proto import x\n", ["writewatch._proto"], 1),
        ("writewatchd", True, "from .service import run\n", ["writewatchd.service"], 1),
        (
            "writewatchd.service.hub",
            False,
            "from ..kernel import procfs\nimport grpc\n",
            ["grpc", "writewatchd.kernel.procfs"],
            0,
        ),
    ],
)
def test_the_checker_resolves_and_catches_imports(
    module: str, is_package: bool, source: str, expected: list[str], n_violations: int
) -> None:
    imports = imports_of(source, module, is_package=is_package)
    assert sorted(i.target for i in imports) == expected
    assert len(layering_violations(imports)) == n_violations
