"""The committed generated code must match what proto/generate.py makes from the .proto files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_generated_code_matches_proto() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "proto" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_generated_service_keeps_the_wire_package_name() -> None:
    from writewatch._proto.writewatch.v1 import writewatch_pb2

    service = writewatch_pb2.DESCRIPTOR.services_by_name["WriteWatch"]
    assert service.full_name == "writewatch.v1.WriteWatch"
    assert writewatch_pb2.Delta.__module__ == "writewatch._proto.writewatch.v1.writewatch_pb2"
