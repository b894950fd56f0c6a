//! `GET /v1/openapi.json`: the HTTP API described as OpenAPI 3.1. Request
//! bodies' schemas come from the same types the server parses (schemars),
//! so they cannot drift from what is accepted.

use serde_json::{json, Value};

use super::cli_child::{CreateOptions, ExecOptions, RunOptions};

fn schema<T: schemars::JsonSchema>() -> Value {
    let mut value = serde_json::to_value(schemars::schema_for!(T)).expect("schema");
    if let Some(object) = value.as_object_mut() {
        object.remove("$schema");
    }
    value
}

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } }
    })
}

fn json_body(reference: &str) -> Value {
    json!({
        "required": true,
        "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{reference}") } } }
    })
}

fn ndjson(description: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/x-ndjson": { "schema": { "$ref": "#/components/schemas/Event" } } }
    })
}

fn name_parameter() -> Value {
    json!({ "name": "name", "in": "path", "required": true, "schema": { "type": "string" },
            "description": "The kept sandbox's name, as `sandbox list` shows it" })
}

pub fn document() -> Value {
    let errors = json!({
        "400": error_response("agentkernel refused the request (bad option or body); `error` and `fix` are the CLI's message"),
        "401": error_response("TCP only: missing or wrong bearer token"),
        "404": error_response("no such sandbox, file or endpoint"),
        "409": error_response("a sandbox of that name already exists"),
        "500": error_response("agentkernel failed (state, backend)"),
        "503": error_response("the backend is unavailable here"),
    });
    let with = |ok: (&str, Value)| {
        let mut responses = errors.clone();
        responses[ok.0] = ok.1;
        responses
    };
    let sandbox = json!({ "description": "The sandbox, as `sandbox info --json` prints it (docs/json.md)",
                          "content": { "application/json": { "schema": { "type": "object" } } } });
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "agentkernel",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Run commands in throwaway, isolated sandboxes. Every request runs the agentkernel CLI, so options, validation and messages are the CLI's."
        },
        "paths": {
            "/v1/health": { "get": { "summary": "The server is up", "responses": with(("200", json!({
                "description": "`{status: \"ok\", version}`",
                "content": { "application/json": { "schema": { "type": "object" } } } }))) } },
            "/v1/openapi.json": { "get": { "summary": "This document", "responses": { "200": { "description": "OpenAPI 3.1" } } } },
            "/v1/run": { "post": {
                "summary": "Run a command in a temporary sandbox (`agentkernel run`), streaming its output",
                "requestBody": json_body("RunOptions"),
                "responses": with(("200", ndjson("Events, one JSON object a line; the last is `exit`"))) } },
            "/v1/sandboxes": {
                "get": { "summary": "The kept sandboxes (`sandbox list --json`)", "responses": with(("200", json!({
                    "description": "An array of sandboxes (docs/json.md)",
                    "content": { "application/json": { "schema": { "type": "array", "items": { "type": "object" } } } } }))) },
                "post": { "summary": "Create a kept sandbox (`run --keep … -- true`)",
                          "requestBody": json_body("CreateOptions"), "responses": with(("201", sandbox.clone())) } },
            "/v1/sandboxes/{name}": {
                "parameters": [name_parameter()],
                "get": { "summary": "One kept sandbox (`sandbox info --json`)", "responses": with(("200", sandbox)) },
                "delete": { "summary": "Remove a kept sandbox (`sandbox remove`)", "responses": with(("200", json!({
                    "description": "`{removed: NAME}`",
                    "content": { "application/json": { "schema": { "type": "object" } } } }))) } },
            "/v1/sandboxes/{name}/exec": { "post": {
                "summary": "Run a command in a kept sandbox (`agentkernel exec`), streaming its output",
                "parameters": [name_parameter()],
                "requestBody": json_body("ExecOptions"),
                "responses": with(("200", ndjson("Events, one JSON object a line; the last is `exit`"))) } },
            "/v1/sandboxes/{name}/files/{path}": {
                "parameters": [name_parameter(), { "name": "path", "in": "path", "required": true,
                    "schema": { "type": "string" }, "description": "The file's absolute path inside the sandbox (resolved there: symlinks cannot lead out)" }],
                "get": { "summary": "Read a file inside the sandbox", "responses": with(("200", json!({
                    "description": "The file's bytes", "content": { "application/octet-stream": {} } }))) },
                "put": { "summary": "Write (create or replace) a file inside the sandbox",
                         "requestBody": { "required": true, "content": { "application/octet-stream": {} } },
                         "responses": with(("200", json!({ "description": "`{path, bytes}`",
                            "content": { "application/json": { "schema": { "type": "object" } } } }))) } }
        },
        "components": {
            "schemas": {
                "RunOptions": schema::<RunOptions>(),
                "ExecOptions": schema::<ExecOptions>(),
                "CreateOptions": schema::<CreateOptions>(),
                "Error": {
                    "type": "object",
                    "required": ["error", "fix"],
                    "properties": {
                        "error": { "type": "string", "description": "What is wrong (the CLI's one-line message up to its first `; `)" },
                        "fix": { "type": ["string", "null"], "description": "How to fix it, when the message names a fix" }
                    }
                },
                "Event": {
                    "type": "object",
                    "required": ["type"],
                    "properties": {
                        "type": { "enum": ["stdout", "stderr", "exit"] },
                        "data": { "type": "string", "description": "stdout/stderr: the bytes, when they are UTF-8" },
                        "data_base64": { "type": "string", "description": "stdout/stderr: the bytes, base64, when they are not UTF-8" },
                        "code": { "type": "integer", "description": "exit: the exit code (the command's, or 125 when agentkernel failed, 124 timeout, 128+N signal)" },
                        "error": { "type": ["string", "null"], "description": "exit: agentkernel's own failure, when there was one" },
                        "fix": { "type": ["string", "null"], "description": "exit: its fix" }
                    }
                }
            },
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer",
                "description": "Required on TCP (--listen with --token-file); the unix socket is protected by its mode 0600" } }
        }
    })
}
