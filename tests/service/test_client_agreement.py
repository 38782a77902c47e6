"""What the daemon owns but the client must agree on: its enums (equal to the wire's and the
client's, member for member), its default address, and the error reasons it names."""

from __future__ import annotations

import enum

import pytest
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

import writewatch
from writewatch._exceptions import ERROR_REASON_KEY, ERRORS_BY_REASON, rpc_error
from writewatch._proto.writewatch.v1 import writewatch_pb2 as pb
from writewatchd.service import enums
from writewatchd.service.settings import Settings, default_listen_address
from writewatchd.service.status import ERROR_REASON_KEY as SERVER_ERROR_REASON_KEY
from writewatchd.service.status import ERROR_REASONS


def _wire_members(wrapper: EnumTypeWrapper, prefix: str) -> dict[str, int]:
    return {name.removeprefix(prefix): number for name, number in wrapper.items()}


@pytest.mark.parametrize(
    ("service_enum", "client_enum", "wrapper", "prefix"),
    [
        (enums.AttachMode, writewatch.AttachMode, pb.AttachMode, "ATTACH_MODE_"),
        (enums.EndReason, writewatch.EndReason, pb.EndReason, "END_REASON_"),
    ],
)
def test_service_enum_equals_wire_and_client(
    service_enum: type[enum.IntEnum], client_enum: type[enum.IntEnum], wrapper: EnumTypeWrapper, prefix: str
) -> None:
    service = {member.name: int(member) for member in service_enum}
    assert service == _wire_members(wrapper, prefix)
    assert service == {member.name: int(member) for member in client_enum}


def test_session_states_are_the_wire_states() -> None:
    wire = _wire_members(pb.SessionState, "SESSION_STATE_")
    del wire["UNSPECIFIED"]
    assert [state.value for state in enums.SessionState] == list(wire)


@pytest.mark.parametrize("runtime_dir", [None, "/run/user/1000", "/tmp/xdg runtime"])
def test_daemon_listens_where_the_client_looks(monkeypatch: pytest.MonkeyPatch, runtime_dir: str | None) -> None:
    if runtime_dir is None:
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    else:
        monkeypatch.setenv("XDG_RUNTIME_DIR", runtime_dir)
    assert default_listen_address() == writewatch.default_address()
    assert Settings().listen == writewatch.default_address()


def test_every_client_error_reason_is_one_the_daemon_sends_with_the_same_code() -> None:
    for reason, cls in ERRORS_BY_REASON.items():
        assert reason in ERROR_REASONS, reason
        assert rpc_error(ERROR_REASONS[reason], "m", reason).__class__ is cls
    assert ERROR_REASON_KEY == SERVER_ERROR_REASON_KEY
