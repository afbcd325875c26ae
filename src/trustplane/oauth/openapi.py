"""OpenAPI descriptions of the protocol endpoints, which are plain Starlette routes (for speed) and so
are not described by FastAPI itself. The fuzz tests drive these descriptions."""

from __future__ import annotations

from typing import Any

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}, "error_description": {"type": "string"}},
}
_CLIENT_AUTH = {
    "client_id": {"type": "string"},
    "client_secret": {"type": "string"},
    "client_assertion_type": {"type": "string"},
    "client_assertion": {"type": "string"},
}


def _form_post(
    summary: str, properties: dict[str, Any], required: list[str], ok: dict[str, Any]
) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {
                    "application/x-www-form-urlencoded": {
                        "schema": {
                            "type": "object",
                            "properties": {**properties, **_CLIENT_AUTH},
                            "required": required,
                        }
                    }
                },
            },
            "responses": {
                "200": ok,
                "400": {
                    "description": "RFC 6749 §5.2 error",
                    "content": {"application/json": {"schema": _ERROR}},
                },
                "401": {
                    "description": "client authentication failed",
                    "content": {"application/json": {"schema": _ERROR}},
                },
                "503": {
                    "description": "a dependency is unavailable (fail closed)",
                    "content": {"application/json": {"schema": _ERROR}},
                },
            },
        }
    }


def protocol_paths() -> dict[str, Any]:
    json_ok = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    return {
        "/token": _form_post(
            "Token endpoint (RFC 6749 §3.2)",
            {
                "grant_type": {
                    "type": "string",
                    "enum": [
                        "client_credentials",
                        "authorization_code",
                        "refresh_token",
                        "urn:ietf:params:oauth:grant-type:jwt-bearer",
                        "urn:ietf:params:oauth:grant-type:token-exchange",
                    ],
                },
                "scope": {"type": "string"},
                "resource": {"type": "string"},
                "code": {"type": "string"},
                "redirect_uri": {"type": "string"},
                "code_verifier": {"type": "string"},
                "refresh_token": {"type": "string"},
                "assertion": {"type": "string"},
                "subject_token": {"type": "string"},
                "subject_token_type": {"type": "string"},
                "actor_token": {"type": "string"},
                "actor_token_type": {"type": "string"},
                "audience": {"type": "string"},
                "authorization_details": {"type": "string"},
            },
            ["grant_type"],
            json_ok,
        ),
        "/introspect": _form_post(
            "Token introspection (RFC 7662)",
            {"token": {"type": "string"}, "token_type_hint": {"type": "string"}},
            ["token"],
            json_ok,
        ),
        "/revoke": _form_post(
            "Token revocation (RFC 7009)",
            {"token": {"type": "string"}, "token_type_hint": {"type": "string"}},
            ["token"],
            {"description": "revoked, or nothing to revoke"},
        ),
        "/jwks": {
            "get": {"summary": "Signing keys (RFC 7517 JWK Set)", "responses": {"200": json_ok}}
        },
        "/.well-known/oauth-authorization-server": {
            "get": {
                "summary": "Authorization server metadata (RFC 8414)",
                "responses": {"200": json_ok},
            }
        },
    }
