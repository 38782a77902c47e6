"""Fixtures of the client tests: the fake servicer served on a Unix socket in a private directory."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from fake_writewatch import EPOCH, SESSION_ID, FakeWriteWatch

from writewatch._proto.writewatch.v1 import writewatch_pb2 as pb
from writewatch._proto.writewatch.v1 import writewatch_pb2_grpc as pb_grpc


@pytest.fixture
def fake() -> Iterator[FakeWriteWatch]:
    """The fake servicer, with one active session SESSION_ID."""
    servicer = FakeWriteWatch()
    servicer.sessions[SESSION_ID] = pb.Session(
        session_id=SESSION_ID, pid=4242, state=pb.SESSION_STATE_ACTIVE, epoch=EPOCH, last_seq=0, comm="target"
    )
    yield servicer


@pytest.fixture
def address(fake: FakeWriteWatch) -> Iterator[str]:
    """Address of a running in-process server backed by the fake servicer."""
    # Short private directory: Unix socket paths are limited to 107 bytes.
    directory = tempfile.mkdtemp(prefix="ww-client-")
    target = f"unix:{directory}/fake.sock"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_WriteWatchServicer_to_server(fake, server)
    server.add_insecure_port(target)
    server.start()
    yield target
    server.stop(grace=None)
    shutil.rmtree(directory, ignore_errors=True)
