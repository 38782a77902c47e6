"""Identities, the role table and the settings that declare them (no daemon needed)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from pydantic import ValidationError

from writewatch._proto.writewatch.v1 import writewatch_pb2 as pb
from writewatchd import LimitExceeded, PolicyDenied
from writewatchd.service.auth import METHOD_ROLES, PUBLIC, Authenticator, AuthMethod, Refused, Role
from writewatchd.service.settings import IdentityPolicy, Settings

_DIGEST = hashlib.sha256(b"s3cret").hexdigest()


def _methods() -> set[str]:
    services = [
        pb.DESCRIPTOR.services_by_name["WriteWatch"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
        reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
    ]
    return {f"/{service.full_name}/{method.name}" for service in services for method in service.methods}


def test_every_served_method_has_a_role_and_no_entry_is_stale() -> None:
    assert set(METHOD_ROLES) == _methods()


def test_control_methods_need_controller() -> None:
    for name in ("CreateSession", "DeleteSession", "AddRanges", "RemoveRanges", "Harvest"):
        assert METHOD_ROLES[f"/writewatch.v1.WriteWatch/{name}"] == Role.CONTROLLER
    assert METHOD_ROLES["/grpc.health.v1.Health/Check"] is PUBLIC


def _authenticator(listen: str = "tcp:127.0.0.1:0", **settings: object) -> Authenticator:
    tokens = [{"name": "obs", "sha256": _DIGEST, "role": "reader"}]
    certs = [{"subject": "lab.example", "role": "controller", "name": "lab"}]
    return Authenticator(
        Settings(listen=listen, insecure_tcp=True, tokens=tokens, client_certs=certs, **settings)  # type: ignore[arg-type]
    )


def _refused(authenticator: Authenticator, metadata: list[tuple[str, str]], auth: dict[str, list[bytes]]) -> str:
    with pytest.raises(Refused) as info:
        authenticator.identify(metadata, auth)
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    return info.value.message


def test_tokens() -> None:
    auth = _authenticator()
    identity = auth.identify([("authorization", "Bearer s3cret")], {})
    assert (identity.name, identity.role, identity.method) == ("obs", Role.READER, AuthMethod.TOKEN)
    assert "not valid" in _refused(auth, [("authorization", "Bearer wrong")], {})
    assert "expected 'Bearer TOKEN'" in _refused(auth, [("authorization", "Basic czNjcmV0")], {})
    assert "expected 'Bearer TOKEN'" in _refused(auth, [("authorization", "Bearer two words")], {})
    two = [("authorization", "Bearer s3cret"), ("authorization", "Bearer s3cret")]
    assert "exactly one" in _refused(auth, two, {})
    assert "no credentials" in _refused(auth, [], {})


def test_certificates_map_by_cn_or_san() -> None:
    auth = _authenticator()
    by_san = auth.identify([], {"x509_common_name": [b"box"], "x509_subject_alternative_name": [b"lab.example"]})
    assert (by_san.name, by_san.role, by_san.method) == ("lab", Role.CONTROLLER, AuthMethod.CLIENT_CERTIFICATE)
    assert auth.identify([], {"x509_common_name": [b"lab.example"]}).role == Role.CONTROLLER
    assert "CN=box" in _refused(auth, [], {"x509_common_name": [b"box"]})


def test_unix_socket_callers_are_admin_unless_tokens_are_required() -> None:
    assert _authenticator("unix:/tmp/x.sock").identify([], {}).role == Role.ADMIN
    strict = _authenticator("unix:/tmp/x.sock", socket_requires_token=True)
    assert "socket_requires_token" in _refused(strict, [], {})
    assert strict.identify([("authorization", "Bearer s3cret")], {}).role == Role.READER


def test_policy_and_limits_name_the_rule() -> None:
    auth = Authenticator(
        Settings(
            tokens=[
                {"name": "ci", "sha256": _DIGEST, "role": "controller", "target_uids": [1000], "target_comm": ["py*"]}
            ],
        )  # type: ignore[list-item]
    )
    ci = auth.identify([("authorization", "Bearer s3cret")], {})
    ci.check_target(7, 1000, "python3")
    with pytest.raises(PolicyDenied, match=r"token 'ci' \(controller\) .* uid 0: rule target_uids = \[1000\]"):
        ci.check_target(7, 0, "python3")
    with pytest.raises(PolicyDenied, match=r"'bash' matches no rule target_comm = \['py\*'\]"):
        ci.check_target(7, 1000, "bash")
    limited = ci.__class__(ci.name, ci.role, ci.method, IdentityPolicy(max_sessions=2), "token")
    limited.check_limit("max_sessions", 1)
    with pytest.raises(LimitExceeded, match=r"at its limit max_sessions = 2 \(in use: 2\)"):
        limited.check_limit("max_sessions", 2)


@pytest.mark.parametrize(
    ("token", "wrong"),
    [
        ({"name": "a", "sha256": _DIGEST, "role": "superuser"}, "tokens.0.role"),
        ({"name": "a", "sha256": "s3cret", "role": "reader"}, "tokens.0.sha256"),
        ({"name": "a b", "sha256": _DIGEST, "role": "reader"}, "tokens.0.name"),
        ({"name": "a", "sha256": _DIGEST, "role": "reader", "max_sesions": 1}, "tokens.0.max_sesions"),
    ],
)
def test_bad_token_settings_name_the_key(token: dict[str, object], wrong: str) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(tokens=[token])  # type: ignore[list-item]
    assert wrong in str(info.value)


def test_duplicate_token_name() -> None:
    tokens = [{"name": "a", "sha256": _DIGEST, "role": "reader"}, {"name": "a", "sha256": "0" * 64, "role": "admin"}]
    with pytest.raises(ValidationError, match="tokens: the name 'a' appears twice"):
        Settings(tokens=tokens)  # type: ignore[arg-type]


def test_unknown_socket_group() -> None:
    with pytest.raises(ValidationError, match="socket_group"):
        Settings(socket_group="no-such-group-here")


def test_settings_file_readable_by_everyone_with_tokens(tmp_path: Path) -> None:
    config = tmp_path / "d.toml"
    config.write_text(f'[[tokens]]\nname = "a"\nsha256 = "{_DIGEST}"\nrole = "reader"\n')
    os.chmod(config, 0o644)
    with pytest.raises(ValueError, match=r"readable by every user \(mode 0644\): chmod o-r"):
        Settings.load(config)
    os.chmod(config, 0o600)
    assert Settings.load(config).tokens[0].name == "a"
    os.chmod(config, 0o602)
    with pytest.raises(ValueError, match="writable by every user"):
        Settings.load(config)
