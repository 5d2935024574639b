"""The API's models and their validation: operator words naming every field, hostile
query strings refused with 400, and the OpenAPI document made from the same models."""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import TestCase
from twisted.web.test.requesthelper import DummyRequest

from myxd.api import models, validate
from myxd.api.app import AdminAPI
from myxd.api.inputs import APIError
from myxd.api.openapi import build_document
from myxd.api.serialize import _AGENT_FIELDS, _COMMAND_FIELDS


def _refused(doc: Any, model: type[Any]) -> APIError:
    try:
        validate.validate(doc, model)
    except APIError as e:
        return e
    raise AssertionError(f"{doc!r} was accepted")


def _query(uri: bytes, model: type[Any]) -> Any:
    request = DummyRequest([])
    request.uri = uri
    return validate.query(request, model)  # type: ignore[arg-type]


class ValidationWordsTests(TestCase):
    def test_every_field_error_is_listed_in_operator_words(self) -> None:
        e = _refused(
            {"host": 5, "rpc_port": 70000, "rpc_path": "a b", "token": "has space", "x": 1},
            models.AdoptAgent,
        )
        self.assertEqual(e.code, 400)
        body = e.body()
        self.assertEqual(
            body["errors"],
            [
                {"field": "host", "error": "host: must be a string"},
                {"field": "rpc_port", "error": "rpc_port: must be at most 65535"},
                {
                    "field": "rpc_path",
                    "error": "rpc_path: must be 1-128 characters of [A-Za-z0-9_-]",
                },
                {
                    "field": "token",
                    "error": "token: must be visible ASCII characters without spaces",
                },
                {"field": "cert_fingerprint", "error": "cert_fingerprint: is required"},
                {"field": "x", "error": "x: is not a known field"},
            ],
        )
        self.assertEqual((body["field"], body["error"]), ("host", "host: must be a string"))

    def test_values_are_never_quoted_back(self) -> None:
        secret = "s3cret-value-\x00"
        e = _refused({"command": "ls", "env": {"A": secret}}, models.NewCommand)
        self.assertEqual(e.body()["field"], "env.A")
        self.assertNotIn("s3cret", json.dumps(e.body()))
        self.assertNotIn("pydantic", json.dumps(e.body()))

    def test_nested_and_union_fields_are_named(self) -> None:
        for doc, field in [
            ({"agents": ["1"], "command": "ls"}, "agents[0]"),
            ({"agents": [1, True], "command": "ls"}, "agents[1]"),
            ({"agents": "some", "command": "ls"}, "agents"),
            ({"agents": {}, "command": "ls"}, "agents"),
            ({"agents": [], "command": "ls"}, "agents"),
            ({"agents": "all", "command": "ls", "env": {"A=B": "x"}}, "env.A=B"),
        ]:
            self.assertEqual(_refused(doc, models.BulkCommand).field, field, doc)
        e = _refused({"agents": {}, "command": "ls"}, models.BulkCommand)
        self.assertEqual(
            e.message, 'agents: must be a non-empty array of agent ids, "all" or "tag:NAME"'
        )


class QueryTests(TestCase):
    def test_good_query(self) -> None:
        q = _query(b"/api/agents?limit=5&status=online", models.AgentListQuery)
        self.assertEqual((q.limit, q.offset, q.status), (5, 0, "online"))

    def test_hostile_query_strings_are_400(self) -> None:
        for uri, model, field in [
            (b"/api/agents?x=%ff", models.AgentListQuery, "x"),
            (b"/api/agents?%ff=1", models.AgentListQuery, "query"),
            (b"/api/agents?limit=%ff", models.AgentListQuery, "limit"),
            (b"/api/events?limit=1&limit=2", models.EventListQuery, "limit"),
            (b"/api/commands/1?offset=1&offset=1", models.CommandReadQuery, "offset"),
            (b"/api/commands/1?wait=nan", models.CommandReadQuery, "wait"),
            (b"/api/commands/1?wait=inf", models.CommandReadQuery, "wait"),
            (b"/api/events?before_id=%ff%fe", models.EventListQuery, "before_id"),
            (b"/api/events?before_id=0", models.EventListQuery, "before_id"),
        ]:
            with self.assertRaises(APIError, msg=uri) as caught:
                _query(uri, model)
            self.assertEqual((caught.exception.code, caught.exception.field), (400, field), uri)


class DocumentTests(TestCase):
    def test_serializers_copy_exactly_the_model_fields(self) -> None:
        self.assertEqual(set(_AGENT_FIELDS), set(models.Agent.model_fields))
        self.assertNotIn("token", _AGENT_FIELDS)
        self.assertNotIn("secret_key", _AGENT_FIELDS)
        self.assertEqual(
            set(_COMMAND_FIELDS) | {"extra", "result", "final"}, set(models.Command.model_fields)
        )

    def test_every_operation_has_real_schemas(self) -> None:
        doc = build_document("test", AdminAPI.operations())
        schemas = doc["components"]["schemas"]
        for path, ops in doc["paths"].items():
            for method, op in ops.items():
                ok = [c for c in op["responses"] if c.startswith("2")]
                self.assertTrue(ok, (path, method))
                for code in ok:
                    content = op["responses"][code]["content"]
                    if "application/json" in content and path != "/api/openapi.json":
                        ref = content["application/json"]["schema"]["$ref"]
                        name = ref.rsplit("/", 1)[1]
                        self.assertIn(name, schemas)
                        self.assertNotEqual(schemas[name].get("properties"), {}, name)
        create = doc["paths"]["/api/servers"]["post"]["requestBody"]["content"]
        self.assertEqual(
            create["application/json"]["schema"], {"$ref": "#/components/schemas/NewServer"}
        )
        secrets = {"password", "private_key", "passphrase", "token", "secret_key"}
        for name in ("Server", "Agent", "SudoView"):
            self.assertFalse(secrets & set(schemas[name]["properties"]), name)
