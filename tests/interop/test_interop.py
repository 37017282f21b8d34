"""Interop test: a Python grpcio client, an implementation independent of tonic, calls the real quotad
binary over the wire, with stubs generated from proto/ at test time.

The binary is target/debug/quotad unless QUOTAD_BIN names another. It is started once for the session
on an ephemeral port with a config written here, with authentication off, and must exit 0 on SIGTERM at
the end; a second one, with authentication on, serves the API key test.
"""

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"
PROTO_FILE = "quota/v1/quota.proto"

# Bounded waits; none of them is a sleep that stands in for synchronisation.
STARTUP_TIMEOUT_S = 30.0
SHUTDOWN_TIMEOUT_S = 30.0
RPC_TIMEOUT_S = 10.0

# A small world in whole messages: packs of 100, one tenant with 3 packs (300 messages).
#   roundtrip-env: 60 allocated, may draw on the tenant pool (300 - 60 - 10 - 10 - 10 - 5 = 205),
#                  then pay-as-you-go up to 50; `roundtrip-app` is linked to it.
#   depletion-env: 10 allocated, no pool, no pay-as-you-go.
#   invalid-env:   10 allocated; bad requests are sent to it and must change nothing.
#   alerts-env:    10 allocated; an agent limit and the alert stream.
#   batch-env:     5 allocated, no pool, no pay-as-you-go; a batch of reservations.
CONFIG_TOML = """\
pack_size_messages = 100
shutdown_grace_seconds = 5

[[bootstrap]]
id = "interop"
packs = 3

[[bootstrap.environments]]
id = "roundtrip-env"
messages = 60
draw_from_tenant_pool = true
payg_enabled = true
payg_budget_messages = 50
apps = ["roundtrip-app"]

[[bootstrap.environments]]
id = "depletion-env"
messages = 10

[[bootstrap.environments]]
id = "invalid-env"
messages = 10

[[bootstrap.environments]]
id = "alerts-env"
messages = 10

[[bootstrap.environments]]
id = "batch-env"
messages = 5
"""
TENANT_POOL_MESSAGES = 300 - 60 - 10 - 10 - 10 - 5
MILLI = 1_000
# The admin token of the server with authentication on; given through QUOTAD_ADMIN_TOKEN.
ADMIN_TOKEN = "interop-admin-token-0123456789"

LISTENING = re.compile(r"\blistening\b.*\baddress=(\S+:\d+)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="session")
def pb(tmp_path_factory):
    """The quota.v1 messages and stubs, generated from proto/ by grpcio-tools' own protoc."""
    out = tmp_path_factory.mktemp("stubs")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={PROTO_ROOT}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            PROTO_FILE,
        ],
        cwd=PROTO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"protoc failed:\n{result.stdout}{result.stderr}"
    sys.path.insert(0, str(out))
    try:
        from quota.v1 import quota_pb2, quota_pb2_grpc
    finally:
        sys.path.remove(str(out))
    return SimpleNamespace(msg=quota_pb2, grpc=quota_pb2_grpc)


class _StderrPump:
    """Reads the server's stderr on a thread, so its pipe never fills, and hands lines to the test."""

    def __init__(self, stream):
        self.lines = queue.Queue()
        self.seen = []
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream):
        for line in stream:
            self.lines.put(ANSI.sub("", line.rstrip("\n")))
        self.lines.put(None)  # EOF: the process closed stderr, normally because it exited.

    def wait_for(self, pattern, timeout_s):
        """The first match of `pattern` in a line, or None if stderr closed first; fails on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"quotad did not log {pattern.pattern!r} within {timeout_s} s; stderr:\n" + self.text())
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                return None
            self.seen.append(line)
            match = pattern.search(line)
            if match:
                return match

    def drain(self, timeout_s):
        self._thread.join(timeout_s)
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return
            if line is not None:
                self.seen.append(line)

    def text(self):
        return "\n".join(self.seen)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real quotad on 127.0.0.1 with an ephemeral port and authentication off; yields its address, then
    SIGTERMs it and checks that it exits 0."""
    yield from _quotad(tmp_path_factory, ["--auth", "off"], {})


@pytest.fixture(scope="session")
def secured_server(tmp_path_factory):
    """Like `server`, with authentication on and an admin token."""
    yield from _quotad(tmp_path_factory, ["--auth", "on"], {"QUOTAD_ADMIN_TOKEN": ADMIN_TOKEN})


def _quotad(tmp_path_factory, flags, extra_env):
    binary = Path(os.environ.get("QUOTAD_BIN", REPO / "target" / "debug" / "quotad"))
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"quotad binary not found at {binary}: run `cargo build` first, or set QUOTAD_BIN")
    config = tmp_path_factory.mktemp("quotad") / "quotad.toml"
    config.write_text(CONFIG_TOML)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTAD_")}
    env["RUST_LOG"] = "info"
    env.update(extra_env)
    proc = subprocess.Popen(
        [
            str(binary),
            "--listen",
            "127.0.0.1:0",
            "--config",
            str(config),
            "--data-dir",
            str(tmp_path_factory.mktemp("data")),
            "--log-format",
            "text",
            *flags,
            # Tests run in parallel; the default metrics port would collide.
            "--metrics-listen",
            "off",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    pump = _StderrPump(proc.stderr)
    try:
        match = pump.wait_for(LISTENING, STARTUP_TIMEOUT_S)
        if match is None:
            code = proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
            pytest.fail(f"quotad exited with code {code} before listening; stderr:\n{pump.text()}")
        address = match.group(1)
        yield SimpleNamespace(address=address, stderr=pump)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pump.drain(5)
            pytest.fail(f"quotad did not exit within {SHUTDOWN_TIMEOUT_S} s of SIGTERM; stderr:\n{pump.text()}")
        pump.drain(5)
    assert code == 0, f"quotad exited with code {code} after SIGTERM; stderr:\n{pump.text()}"


@pytest.fixture(scope="session")
def channel(server):
    with grpc.insecure_channel(server.address) as channel:
        grpc.channel_ready_future(channel).result(timeout=STARTUP_TIMEOUT_S)
        yield channel


@pytest.fixture(scope="session")
def quota(pb, channel):
    return pb.grpc.QuotaStub(channel)


@pytest.fixture(scope="session")
def admin(pb, channel):
    return pb.grpc.QuotaAdminStub(channel)


def _balance(pb, quota, environment_id):
    return quota.GetBalance(pb.msg.GetBalanceRequest(environment_id=environment_id), timeout=RPC_TIMEOUT_S)


def _draws(pb, draws):
    return [(pb.msg.Source.Name(d.source), d.amount_milli) for d in draws]


def _details(error):
    """The google.rpc.Status carried in the grpc-status-details-bin trailer, with its ErrorInfo and
    BadRequest details unpacked."""
    status = rpc_status.from_call(error)
    assert status is not None, f"no rich error details on {error.code()}: {error.details()}"
    return _unpacked(status)


def _unpacked(status):
    """A google.rpc.Status with its ErrorInfo and BadRequest details unpacked."""
    info, bad_request = None, None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
    return SimpleNamespace(status=status, info=info, bad_request=bad_request)


def test_reserve_commit_round_trip_through_a_linked_app_environment(pb, quota):
    """A reservation through a linked app environment draws allocation then tenant pool, and a commit of
    less than reserved, priced with the rate card, charges in draw order and releases the rest."""
    reserved = quota.CheckAndReserve(
        pb.msg.CheckAndReserveRequest(
            environment_id="roundtrip-app",
            agent_id="interop-agent",
            messages=70,
            idempotency_key="interop-roundtrip-1",
        ),
        timeout=RPC_TIMEOUT_S,
    )
    assert reserved.reservation_id
    assert reserved.reserved_milli == 70 * MILLI
    assert _draws(pb, reserved.draws) == [
        ("SOURCE_ENVIRONMENT_ALLOCATION", 60 * MILLI),
        ("SOURCE_TENANT_POOL", 10 * MILLI),
    ]
    assert reserved.expires_at_unix_ms > 0
    held = reserved.balance
    assert held.environment_id == "roundtrip-env"
    assert held.tenant_id == "interop"
    assert held.allocated_milli == 60 * MILLI
    assert held.reserved_milli == 70 * MILLI
    assert held.payg_enabled and held.payg_budget_milli == 50 * MILLI
    assert held.available_milli == (60 + TENANT_POOL_MESSAGES + 50 - 70) * MILLI
    assert re.fullmatch(r"\d{4}-\d{2}", held.period), held.period

    # 30 generative answers (2 messages each) and 50 flow actions (13 per 100): 66.5 messages.
    usage = [
        pb.msg.UsageItem(scenario="generative_answer", quantity=30),
        pb.msg.UsageItem(scenario="agent_flow_actions", quantity=50),
    ]
    committed = quota.Commit(
        pb.msg.CommitRequest(reservation_id=reserved.reservation_id, usage=usage), timeout=RPC_TIMEOUT_S
    )
    assert committed.charged_milli == 66_500
    assert _draws(pb, committed.draws) == [
        ("SOURCE_ENVIRONMENT_ALLOCATION", 60 * MILLI),
        ("SOURCE_TENANT_POOL", 6_500),
    ]
    assert committed.released_milli == 3_500
    assert committed.overage_milli == 0
    assert not committed.late
    after = committed.balance
    assert after.environment_id == "roundtrip-env"
    assert after.reserved_milli == 0
    assert after.allocation_used_milli == 60 * MILLI
    assert after.tenant_pool_used_milli == 6_500
    assert after.payg_used_milli == 0
    assert after.available_milli == (TENANT_POOL_MESSAGES + 50) * MILLI - 6_500

    # A retried commit with the same use answers the same and charges nothing again.
    retried = quota.Commit(
        pb.msg.CommitRequest(reservation_id=reserved.reservation_id, usage=usage), timeout=RPC_TIMEOUT_S
    )
    assert retried.charged_milli == committed.charged_milli
    assert _balance(pb, quota, "roundtrip-env") == after


def test_depletion_is_resource_exhausted_with_quota_depleted_details(pb, quota):
    """When an environment has nothing left a reservation is RESOURCE_EXHAUSTED with ErrorInfo
    QUOTA_DEPLETED (domain quotad), holds nothing, and works again once capacity is released."""
    first = quota.CheckAndReserve(
        pb.msg.CheckAndReserveRequest(environment_id="depletion-env", agent_id="interop-agent", messages=10),
        timeout=RPC_TIMEOUT_S,
    )
    assert first.balance.available_milli == 0
    assert first.balance.state == pb.msg.STATE_DEPLETED

    with pytest.raises(grpc.RpcError) as refused:
        quota.CheckAndReserve(
            pb.msg.CheckAndReserveRequest(environment_id="depletion-env", agent_id="interop-agent", messages=1),
            timeout=RPC_TIMEOUT_S,
        )
    error = refused.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert error.details(), "the refusal carries a message a person can act on"
    details = _details(error)
    assert details.status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert details.info is not None, f"no ErrorInfo in {details.status}"
    assert details.info.reason == "QUOTA_DEPLETED"
    assert details.info.domain == "quotad"
    expected_metadata = {"environment_id": "depletion-env", "requested_milli": str(1 * MILLI), "available_milli": "0"}
    assert expected_metadata.items() <= dict(details.info.metadata).items(), details.info.metadata
    assert _balance(pb, quota, "depletion-env").reserved_milli == 10 * MILLI

    released = quota.Release(pb.msg.ReleaseRequest(reservation_id=first.reservation_id), timeout=RPC_TIMEOUT_S)
    assert released.released_milli == 10 * MILLI
    again = quota.CheckAndReserve(
        pb.msg.CheckAndReserveRequest(environment_id="depletion-env", agent_id="interop-agent", messages=1),
        timeout=RPC_TIMEOUT_S,
    )
    assert again.reserved_milli == 1 * MILLI


@pytest.mark.parametrize("service", ["", "quota.v1.Quota"])
def test_standard_health_service_reports_serving(channel, service):
    """The standard grpc.health.v1 service reports SERVING for the whole server and for quota.v1.Quota."""
    health = health_pb2_grpc.HealthStub(channel)
    response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_S)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("field", "request_fields"),
    [
        ("ttl_seconds", {"messages": 1, "ttl_seconds": 3_601}),
        ("environment_id", {"environment_id": "", "messages": 1}),
        ("agent_id", {"agent_id": "x" * 129, "messages": 1}),
        ("messages", {"messages": 0}),
        ("messages", {}),
        ("usage[1].scenario", {"usage": [("classic_answer", 1), ("no_such_scenario", 1)]}),
    ],
    ids=["ttl-too-long", "empty-environment", "agent-id-too-long", "zero-messages", "no-amount", "unknown-scenario"],
)
def test_invalid_argument_names_the_field_and_changes_nothing(pb, quota, field, request_fields):
    """A bad request is INVALID_ARGUMENT whose message and BadRequest detail name the field, and it holds
    nothing."""
    fields = {"environment_id": "invalid-env", "agent_id": "interop-agent", **request_fields}
    fields["usage"] = [pb.msg.UsageItem(scenario=s, quantity=q) for s, q in fields.get("usage", [])]
    before = _balance(pb, quota, "invalid-env")

    with pytest.raises(grpc.RpcError) as refused:
        quota.CheckAndReserve(pb.msg.CheckAndReserveRequest(**fields), timeout=RPC_TIMEOUT_S)
    error = refused.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert field in error.details(), error.details()
    details = _details(error)
    assert field in details.status.message
    assert details.bad_request is not None, f"no BadRequest in {details.status}"
    assert [v.field for v in details.bad_request.field_violations] == [field]
    assert _balance(pb, quota, "invalid-env") == before


def test_a_reservation_batch_answers_each_item_in_request_order(pb, quota):
    """CheckAndReserveBatch answers one result per item, in request order: a grant as CheckAndReserve
    answers it, or the google.rpc.Status of the item's refusal (its code, and an ErrorInfo or a BadRequest
    as the unary call gives); a refused item holds nothing and the items after it are granted."""

    def item(messages, environment_id="batch-env"):
        return pb.msg.CheckAndReserveRequest(environment_id=environment_id, agent_id="interop-agent", messages=messages)

    batch = pb.msg.CheckAndReserveBatchRequest(items=[item(3), item(3), item(1, environment_id=""), item(2)])
    results = quota.CheckAndReserveBatch(batch, timeout=RPC_TIMEOUT_S).results
    assert [result.WhichOneof("outcome") for result in results] == ["ok", "error", "error", "ok"]
    assert results[0].ok.reservation_id and results[0].ok.reserved_milli == 3 * MILLI
    assert results[0].ok.balance.environment_id == "batch-env"

    depleted = _unpacked(results[1].error)
    assert depleted.status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], depleted.status
    assert depleted.info is not None and depleted.info.reason == "QUOTA_DEPLETED", depleted.status
    assert depleted.info.domain == "quotad"
    assert dict(depleted.info.metadata)["available_milli"] == str(2 * MILLI)

    invalid = _unpacked(results[2].error)
    assert invalid.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], invalid.status
    assert invalid.bad_request is not None, invalid.status
    assert [v.field for v in invalid.bad_request.field_violations] == ["environment_id"]
    assert "environment_id" in invalid.status.message

    assert results[3].ok.reserved_milli == 2 * MILLI
    assert results[3].ok.reservation_id != results[0].ok.reservation_id
    assert _balance(pb, quota, "batch-env").reserved_milli == 5 * MILLI


def test_agent_limit_refusal_and_the_alert_stream(pb, quota, admin):
    """An agent limit refuses with AGENT_LIMIT_REACHED, and WatchAlerts streams to a grpcio client the
    environment's current level, then the alert that a reservation fires."""
    admin.SetAgentLimit(
        pb.msg.SetAgentLimitRequest(
            environment_id="alerts-env", agent_id="capped-agent", monthly_limit_messages=3, stop_when_exceeded=True
        ),
        timeout=RPC_TIMEOUT_S,
    )
    with pytest.raises(grpc.RpcError) as refused:
        quota.CheckAndReserve(
            pb.msg.CheckAndReserveRequest(environment_id="alerts-env", agent_id="capped-agent", messages=4),
            timeout=RPC_TIMEOUT_S,
        )
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
    details = _details(refused.value)
    assert details.info is not None and details.info.reason == "AGENT_LIMIT_REACHED", details.status

    stream = admin.WatchAlerts(
        pb.msg.WatchAlertsRequest(tenant_id="interop", environment_id="alerts-env"), timeout=RPC_TIMEOUT_S
    )
    try:
        current = next(stream)
        assert current.initial and current.kind == pb.msg.ALERT_KIND_ENVIRONMENT_RESTORED, current
        quota.CheckAndReserve(
            pb.msg.CheckAndReserveRequest(environment_id="alerts-env", agent_id="other-agent", messages=10),
            timeout=RPC_TIMEOUT_S,
        )
        fired = next(stream)
        assert not fired.initial and fired.kind == pb.msg.ALERT_KIND_ENVIRONMENT_DEPLETED, fired
        assert fired.balance.available_milli == 0 and fired.tenant_id == "interop"
    finally:
        stream.cancel()


def test_an_api_key_in_grpcio_metadata(pb, secured_server):
    """With authentication on, an admin creates an API key with the admin token; an agent call that sends
    the key's secret as grpcio metadata is served, one without credentials is UNAUTHENTICATED with reason
    INVALID_CREDENTIALS, and an environment outside the key's list is PERMISSION_DENIED with reason
    OUTSIDE_KEY_SCOPE. Listing the keys shows the key's last use, never its secret."""
    with grpc.insecure_channel(secured_server.address) as channel:
        grpc.channel_ready_future(channel).result(timeout=STARTUP_TIMEOUT_S)
        admin = pb.grpc.QuotaAdminStub(channel)
        quota = pb.grpc.QuotaStub(channel)
        as_admin = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
        key = admin.CreateApiKey(
            pb.msg.CreateApiKeyRequest(tenant_id="interop", environment_ids=["depletion-env"], description="interop"),
            metadata=as_admin,
            timeout=RPC_TIMEOUT_S,
        )
        assert key.secret.startswith(f"qk_{key.key_id}_"), key
        as_agent = (("authorization", f"Bearer {key.secret}"),)

        def reserve(environment_id, metadata):
            request = pb.msg.CheckAndReserveRequest(environment_id=environment_id, agent_id="interop-agent", messages=1)
            return quota.CheckAndReserve(request, metadata=metadata, timeout=RPC_TIMEOUT_S)

        reserved = reserve("depletion-env", as_agent)
        assert reserved.reserved_milli == 1 * MILLI
        assert reserved.balance.tenant_id == "interop"

        with pytest.raises(grpc.RpcError) as refused:
            reserve("depletion-env", ())
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value
        details = _details(refused.value)
        assert details.info is not None and details.info.reason == "INVALID_CREDENTIALS", details.status

        with pytest.raises(grpc.RpcError) as outside:
            reserve("roundtrip-env", as_agent)
        assert outside.value.code() == grpc.StatusCode.PERMISSION_DENIED, outside.value
        details = _details(outside.value)
        assert details.info is not None and details.info.reason == "OUTSIDE_KEY_SCOPE", details.status

        listed = admin.ListApiKeys(
            pb.msg.ListApiKeysRequest(tenant_id="interop"), metadata=as_admin, timeout=RPC_TIMEOUT_S
        )
        assert [k.key_id for k in listed.api_keys] == [key.key_id]
        assert listed.api_keys[0].secret == ""
        assert listed.api_keys[0].last_used_unix_ms > 0
        assert listed.api_keys[0].open_reservations == 1
