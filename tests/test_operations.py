"""Day-two operations: metrics, decision log, hot reload, graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ext_authz._proto.envoy.service.auth.v3 import external_auth_pb2_grpc
from ext_authz.policy.config import load_config
from ext_authz.server import Sidecar
from tests.certs import make_certs
from tests.test_service import check_request
from tests.token_endpoint import TokenEndpoint

SECRET = "ops-secret-5f1c9a"


def base_config(token_url: str, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "grpc": {"listen": "127.0.0.1:0"},
        "admin": {"listen": "127.0.0.1:0"},
        "network": {"internal_ranges": ["127.0.0.1/32"], "trusted_proxies": ["127.0.0.3/32"]},
        "tokens": {"retry_initial_s": 0.1, "retry_max_s": 0.2},
        "servers": {
            "pub": {},
            "priv": {"available_on_public_internet": False},
            "gh": {"oauth2": {"token_url": token_url, "client_id": "gh",
                              "client_secret": SECRET}},
        },
    }
    config.update(extra)
    return config


def write(path: Path, config: dict[str, Any] | str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    os.replace(tmp, path)


async def started(path: Path) -> Sidecar:
    sidecar = Sidecar(load_config(path), path, grace_s=2)
    await sidecar.start()
    await asyncio.wait_for(sidecar.tokens.wait_ready(), 5)
    return sidecar


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class TestMetrics:
    async def test_counts_match_traffic(self, tmp_path: Path,
                                        token_endpoint: TokenEndpoint) -> None:
        """After known traffic the scraped counters are exact."""
        path = tmp_path / "c.yaml"
        write(path, base_config(token_endpoint.url))
        sidecar = await started(path)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as channel:
                stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                for _ in range(3):
                    await stub.Check(check_request(peer="127.0.0.2", path="/mcp/pub"))
                for _ in range(2):
                    await stub.Check(check_request(peer="127.0.0.2", path="/mcp/priv"))
                await stub.Check(check_request(peer="127.0.0.2", path="/mcp/unknown"))
                for _ in range(4):
                    await stub.Check(check_request(peer="127.0.0.1", path="/mcp/gh"))
            metrics = await asyncio.to_thread(scrape, sidecar.admin_port or 0)
        finally:
            await sidecar.stop()

        def checks(server: str, network: str, reason: str) -> float:
            labels = (("network", network), ("reason", reason), ("server", server), ("tool", ""))
            return metrics[("mcp_ext_authz_checks_total", labels)]

        assert checks("pub", "external", "allowed") == 3
        assert checks("priv", "external", "not_found") == 2
        assert checks("", "external", "not_found") == 1
        assert checks("gh", "internal", "allowed") == 4
        assert metrics[("mcp_ext_authz_check_duration_seconds_count", ())] == 10
        assert metrics[("mcp_ext_authz_check_duration_seconds_bucket", (("le", "+Inf"),))] == 10
        assert 0 < metrics[("mcp_ext_authz_check_duration_seconds_sum", ())] < 10
        assert metrics[("mcp_ext_authz_token_fetches_total",
                        (("outcome", "ok"), ("server", "gh")))] == 1
        assert metrics[("mcp_ext_authz_token_age_seconds", (("server", "gh"),))] >= 0
        assert metrics[("mcp_ext_authz_config_generation", ())] == 1
        # No series was minted for the unknown server's name.
        assert not any("unknown" in str(key) for key in metrics)

    async def test_health_and_readiness_endpoints(self, tmp_path: Path,
                                                  token_endpoint: TokenEndpoint) -> None:
        """/healthz answers while alive; /readyz says what it waits for until tokens are warm."""
        token_endpoint.mode, token_endpoint.status = "status", 500
        path = tmp_path / "c.yaml"
        write(path, base_config(token_endpoint.url))
        sidecar = Sidecar(load_config(path), path)
        await sidecar.start()
        try:
            base = f"http://127.0.0.1:{sidecar.admin_port}"
            async with httpx.AsyncClient() as http:
                assert (await http.get(f"{base}/healthz")).status_code == 200
                for _ in range(100):  # until the first fetch has failed
                    waiting = await http.get(f"{base}/readyz")
                    if "HTTP 500" in waiting.text:
                        break
                    await asyncio.sleep(0.02)
                assert waiting.status_code == 503
                assert "HTTP 500" in waiting.json()["waiting_for"]["gh"]
                token_endpoint.healthy()
                await asyncio.sleep(0.4)
                ready = await http.get(f"{base}/readyz")
                assert (ready.status_code, ready.json()) == (200, {"ready": True,
                                                                   "unavailable": {}})
                assert (await http.get(f"{base}/nope")).status_code == 404
        finally:
            await sidecar.stop()

    async def test_readiness_names_a_server_that_lost_its_token(
            self, tmp_path: Path, token_endpoint: TokenEndpoint) -> None:
        """Once serving, a token that expires with no successor does not take the sidecar
        out of service (its other servers still answer): /readyz stays 200 and names the
        server whose requests answer 503 now, as a Check does."""
        token_endpoint.expires_in = 0.5
        path = tmp_path / "c.yaml"
        write(path, base_config(token_endpoint.url, tokens={
            "expiry_buffer_s": 0, "min_ttl_s": 0.1, "retry_initial_s": 5, "retry_max_s": 5}))
        sidecar = Sidecar(load_config(path), path)
        await sidecar.start()
        try:
            await asyncio.wait_for(sidecar.tokens.wait_ready(), 5)
            token_endpoint.mode, token_endpoint.status = "status", 500
            base = f"http://127.0.0.1:{sidecar.admin_port}"
            async with httpx.AsyncClient() as http:
                for _ in range(100):
                    ready = await http.get(f"{base}/readyz")
                    if ready.json().get("unavailable"):
                        break
                    await asyncio.sleep(0.02)
            assert ready.status_code == 200
            assert ready.json()["ready"] is True
            assert "HTTP 500" in ready.json()["unavailable"]["gh"]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as channel:
                stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                answer = await stub.Check(check_request(path="/mcp/gh"), timeout=3)
            assert answer.denied_response.status.code == 503
        finally:
            await sidecar.stop()


class TestDecisionLog:
    async def test_lines_for_allow_deny_and_503(self, tmp_path: Path,
                                                token_endpoint: TokenEndpoint) -> None:
        """One JSON line per check, with the documented fields and no token or secret."""
        log_path = tmp_path / "decisions.jsonl"
        path = tmp_path / "c.yaml"
        write(path, base_config(token_endpoint.url, decision_log={"path": str(log_path)}))
        sidecar = await started(path)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as channel:
                stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                allowed = await stub.Check(check_request(path="/mcp/gh"))
                await stub.Check(check_request(peer="127.0.0.2", path="/mcp/priv?key=q-secret",
                                               xff="127.0.0.1"))
                write(path, base_config("http://127.0.0.1:9/down",
                                        decision_log={"path": str(log_path)}))
                assert await sidecar.reload()
                unavailable = await stub.Check(check_request(path="/mcp/gh"), timeout=1)
        finally:
            await sidecar.stop()
        assert unavailable.denied_response.status.code == 503
        text = log_path.read_text()
        records = [json.loads(line) for line in text.splitlines()]
        assert [r["reason"] for r in records] == [
            "allowed", "not_found", "upstream_credentials_unavailable"]
        first = records[0]
        assert set(first) >= {"time", "decision_id", "server", "client_ip", "network", "peer",
                              "reason", "allowed", "latency_ms"}
        assert first["decision_id"] == allowed.dynamic_metadata["decision_id"]
        assert records[1]["path"] == "/mcp/priv"  # the query string is not logged
        assert "ConnectError" in records[2]["detail"]
        for needle in (SECRET, "caller-own", "q-secret", *token_endpoint.issued):
            assert needle not in text

    async def test_sampling_keeps_denials(self, tmp_path: Path,
                                          token_endpoint: TokenEndpoint) -> None:
        """sample_allowed: 0 writes denials only."""
        log_path = tmp_path / "decisions.jsonl"
        path = tmp_path / "c.yaml"
        write(path, base_config(token_endpoint.url, decision_log={
            "path": str(log_path), "sample_allowed": 0}))
        sidecar = await started(path)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as channel:
                stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                for _ in range(5):
                    await stub.Check(check_request(path="/mcp/pub"))
                await stub.Check(check_request(path="/mcp/nope"))
        finally:
            await sidecar.stop()
        records = [json.loads(line) for line in log_path.read_text().splitlines()]
        assert [r["reason"] for r in records] == ["not_found"]


@pytest.mark.slow  # a real Envoy or Python process per test
class TestReload:
    async def test_reload_under_load(self, tmp_path: Path,
                                     token_endpoint: TokenEndpoint) -> None:
        """20 rewrites, valid and invalid alternately, under continuous checks: no failed
        RPC, each valid version takes effect, each invalid one is counted and ignored."""
        path = tmp_path / "c.yaml"
        config = base_config(token_endpoint.url, reload={"poll_interval_s": 0.02})
        write(path, config)
        sidecar = await started(path)
        failures: list[BaseException] = []
        answered = 0
        stop = asyncio.Event()

        async def load(stub: Any) -> None:
            nonlocal answered
            while not stop.is_set():
                try:
                    response = await stub.Check(check_request(path="/mcp/gh"), timeout=2)
                    assert response.status.code == 0
                    answered += 1
                except BaseException as exc:  # every failure counts
                    failures.append(exc)
                    return

        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as channel:
                stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                workers = [asyncio.create_task(load(stub)) for _ in range(4)]
                for version in range(1, 21):
                    generation = sidecar.service.state.generation
                    rejected = sidecar.metrics.config_reloads.labels("rejected")._value.get()
                    if version % 2:
                        servers = {**config["servers"], f"v{version}": {}}
                        write(path, {**config, "servers": servers})
                        for _ in range(200):
                            if sidecar.service.state.generation > generation:
                                break
                            await asyncio.sleep(0.01)
                        assert sidecar.service.state.generation == generation + 1
                        response = await stub.Check(check_request(path=f"/mcp/v{version}"))
                        assert response.status.code == 0, version
                    else:
                        write(path, f"servers: {{v{version}: {{oauth2: 42}}}}\n")
                        for _ in range(200):
                            if sidecar.metrics.config_reloads.labels(
                                    "rejected")._value.get() > rejected:
                                break
                            await asyncio.sleep(0.01)
                        assert sidecar.service.state.generation == generation
                        response = await stub.Check(check_request(path=f"/mcp/v{version - 1}"))
                        assert response.status.code == 0, version
                stop.set()
                await asyncio.gather(*workers)
        finally:
            await sidecar.stop()
        assert failures == []
        assert answered > 20
        assert sidecar.service.state.generation == 11
        assert sidecar.metrics.config_reloads.labels("rejected")._value.get() == 10
        # The unchanged credential kept its token through all 10 reloads.
        assert token_endpoint.count == 1

    async def test_rotated_secret_file_gets_new_token(self, tmp_path: Path,
                                                      token_endpoint: TokenEndpoint) -> None:
        """Rewriting a client_secret_file reloads and fetches with the new secret."""
        secret = tmp_path / "secret"
        secret.write_text("first\n")
        config = base_config(token_endpoint.url, reload={"poll_interval_s": 0.02})
        config["servers"]["gh"]["oauth2"] = {"token_url": token_endpoint.url, "client_id": "gh",
                                             "client_secret_file": str(secret)}
        path = tmp_path / "c.yaml"
        write(path, config)
        sidecar = await started(path)
        try:
            write(secret, "second\n")
            for _ in range(200):
                if token_endpoint.count == 2:
                    break
                await asyncio.sleep(0.01)
        finally:
            await sidecar.stop()
        assert [r.client_secret for r in token_endpoint.requests] == ["first", "second"]

    async def test_listen_change_needs_restart(self, tmp_path: Path,
                                               token_endpoint: TokenEndpoint) -> None:
        """A reload that changes the listen address is rejected, naming the key."""
        path = tmp_path / "c.yaml"
        config = base_config(token_endpoint.url)
        write(path, config)
        sidecar = await started(path)
        try:
            write(path, {**config, "grpc": {"listen": "127.0.0.1:1"}})
            assert await sidecar.reload() is False
            assert sidecar.config.grpc.listen == "127.0.0.1:0"
        finally:
            await sidecar.stop()


    async def test_every_kind_of_bad_reload_is_logged_and_counted_once(
            self, tmp_path: Path, token_endpoint: TokenEndpoint,
            caplog: pytest.LogCaptureFixture) -> None:
        """Not UTF-8, a TLS key that is not the certificate's, bad YAML: each edit is one
        logged rejection, the old config serves on, and a later good edit is applied."""
        certs = make_certs(tmp_path)
        path = tmp_path / "c.yaml"
        tls = {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key)}
        config = base_config(token_endpoint.url, reload={"poll_interval_s": 0.02},
                             grpc={"listen": "127.0.0.1:0", "tls": tls})
        write(path, config)
        sidecar = await started(path)
        rejected = sidecar.metrics.config_reloads.labels("rejected")
        try:
            assert sidecar.metrics.config_last_reload_ok._value.get() == 1  # not 0 at boot
            bad = [b"servers: {a: {}}\n# caf\xe9\n",
                   yaml.safe_dump({**config, "grpc": {"listen": "127.0.0.1:0", "tls": {
                       **tls, "key_file": str(certs.client_key)}}}).encode(),
                   b"servers: [a,\n"]
            for count, data in enumerate(bad, start=1):
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(data)
                os.replace(tmp, path)
                await sidecar.reload()  # as SIGHUP does, racing the file watch
                for _ in range(50):  # the watch has polled this edit many times over
                    await asyncio.sleep(0.02)
                assert rejected._value.get() == count, data
                assert sidecar.service.state.generation == 1
            assert sidecar.metrics.config_last_reload_ok._value.get() == 0
            messages = [r.getMessage() for r in caplog.records
                        if "reload rejected" in r.getMessage()]
            assert len(messages) == 3
            assert "not UTF-8" in messages[0]
            assert "does not match grpc.tls.cert_file" in messages[1]
            write(path, {**config, "servers": {**config["servers"], "later": {}}})
            for _ in range(200):
                if sidecar.service.state.generation == 2:
                    break
                await asyncio.sleep(0.01)
            assert "later" in sidecar.config.servers
        finally:
            await sidecar.stop()


@pytest.mark.slow  # a real Envoy or Python process per test
class TestShutdown:
    async def test_sigterm_during_burst_answers_every_check(
        self, tmp_path: Path, token_endpoint: TokenEndpoint
    ) -> None:
        """Checks in flight at SIGTERM all get answers; the process exits 0."""
        from tests.e2e.harness import free_port

        token_endpoint.delay_s = 3  # checks queue up behind the first (cold) fetch
        port = free_port()
        path = tmp_path / "c.yaml"
        write(path, base_config(token_endpoint.url, grpc={"listen": f"127.0.0.1:{port}"},
                                admin=None))
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ext_authz", "serve", "--config", str(path), "--grace", "5",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await asyncio.wait_for(channel.channel_ready(), 20)
                stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                calls = [asyncio.ensure_future(stub.Check(check_request(path="/mcp/gh"),
                                                          timeout=10)) for _ in range(200)]
                await asyncio.sleep(0.5)
                assert (token_endpoint.count, token_endpoint.issued) == (1, [])  # still fetching
                process.send_signal(signal.SIGTERM)
                responses = await asyncio.gather(*calls)
            code = await asyncio.wait_for(process.wait(), 15)
        finally:
            if process.returncode is None:
                process.kill()
        assert code == 0
        assert all(r.status.code == 0 for r in responses)
        assert {r.ok_response.headers[0].header.value for r in responses} == {
            f"Bearer {token_endpoint.issued[0]}"}


@pytest.mark.slow  # a real Envoy or Python process per test
class TestWorkers:
    async def test_two_workers_on_consecutive_ports(self, tmp_path: Path,
                                                    token_endpoint: TokenEndpoint) -> None:
        """`serve --workers 2`: each worker answers on its port, reloads on SIGHUP, drains
        on SIGTERM; each fetched its own token before reporting ready."""
        from tests.e2e.harness import free_port

        grpc_port, admin_port = free_port(), free_port()
        path = tmp_path / "c.yaml"
        config = base_config(token_endpoint.url, grpc={"listen": f"127.0.0.1:{grpc_port}"},
                             admin={"listen": f"127.0.0.1:{admin_port}"},
                             reload={"watch": False})
        write(path, config)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ext_authz", "serve", "--config", str(path), "--workers", "2",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            async with httpx.AsyncClient() as http:
                for port in (admin_port, admin_port + 1):
                    for _ in range(200):
                        try:
                            if (await http.get(f"http://127.0.0.1:{port}/readyz")).is_success:
                                break
                        except httpx.HTTPError:
                            pass
                        await asyncio.sleep(0.1)
                assert token_endpoint.count == 2  # one cold fetch per worker
                for port in (grpc_port, grpc_port + 1):
                    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                        assert (await stub.Check(check_request(path="/mcp/gh"))).status.code == 0
                write(path, {**config, "servers": {**config["servers"], "extra": {}}})
                process.send_signal(signal.SIGHUP)
                for port in (admin_port, admin_port + 1):
                    for _ in range(100):
                        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
                        if "mcp_ext_authz_config_generation 2.0" in text:
                            break
                        await asyncio.sleep(0.05)
                    assert "mcp_ext_authz_config_generation 2.0" in text
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 15) == 0
        finally:
            if process.returncode is None:
                process.kill()
