"""A property-based run over the API's own OpenAPI document (schemathesis): for every
operation, generated requests (paths, queries, bodies the schema allows) against the real API
on a real socket over real stores; every answer must be documented (status, content type,
body schema, headers) and none may be a server error.

A domain, a credential and a queued message exist first, so generated requests reach the
success paths too, not only 404s. Bounded: a fixed number of examples per operation.
"""
from __future__ import annotations

import dataclasses

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, ignored_auth, negative_data_rejection,
                                               response_headers_conformance,
                                               response_schema_conformance, status_code_conformance)

from relay.api import SPEC
from relay.config import Config, CredentialsConfig, DomainsConfig, StorageConfig
from relay.operations import Actor
from relay.store.contract import NewMessage, NewRecipient
from tests.support.api_server import ApiServer

schema = schemathesis.openapi.from_dict(SPEC)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, ignored_auth]


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    path = tmp_path_factory.mktemp("api-properties") / "relay.db"
    cfg = dataclasses.replace(Config(), storage=StorageConfig(path=str(path)),
                              credentials=CredentialsConfig(argon2_time_cost=1, argon2_memory_cost=1024,
                                                            argon2_parallelism=1),
                              domains=DomainsConfig(dkim_algorithm="ed25519"))
    with ApiServer(cfg) as server:
        ops, actor = server.ops, Actor("tests", "cli")

        async def seed():
            await ops.add_domain(actor, "mg.example.com")
            await ops.create_credential(actor, "app@mg.example.com", "correct horse battery staple")
            await ops.queue._queue.enqueue(NewMessage(
                "app@mg.example.com", (NewRecipient("bob@example.net", "example.net"),), b"Subject: x\r\n\r\nhi\r\n"))
        server.run(seed())
        server.token = server.add_key("write")
        yield server


@schema.parametrize()
@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
def test_every_answer_matches_the_spec(case, api):
    headers = {"Authorization": f"Bearer {api.token}"}
    # Not positive_data_acceptance: the schema cannot say what a domain name or a strong enough
    # password is, so a schema-valid request may rightly get 422 (its body is checked here).
    case.call_and_validate(base_url=api.url, headers=headers, timeout=10, checks=CHECKS)


# The same operations with data the schema forbids (wrong types, unknown fields, missing
# required ones, out-of-range numbers): each must be refused with a documented 4xx, never a 5xx.
negative = schemathesis.openapi.from_dict(SPEC)
negative.config.generation.update(modes=["negative"])
NEGATIVE_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
                   response_schema_conformance, negative_data_rejection]


@negative.exclude(path="/openapi.json").parametrize()
@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
def test_schema_invalid_requests_are_refused_as_documented(case, api):
    headers = {"Authorization": f"Bearer {api.token}"}
    case.call_and_validate(base_url=api.url, headers=headers, timeout=10, checks=NEGATIVE_CHECKS)
