//! `GET /api/v2/openapi.json`: an OpenAPI 3.1 document of the whole API, built from the
//! same field tables the query parser checks against, so that the two cannot drift.

use axum::Json;
use kiln_engine::storage::{BuildField, BuilderField, BuildsetField, MasterField, RequestField};
use serde_json::{Map, Value, json};

use crate::json as shapes;
use crate::query::Collection;

fn error_responses() -> Value {
    json!({
        "400": {"description": "bad request: an unknown parameter, field or operator, a bad value, or a filter on a single entity", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
        "404": {"description": "no such entity", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
    })
}

fn collection_params<F: Collection>() -> Vec<Value> {
    let mut params: Vec<Value> = F::ALL
        .iter()
        .map(|f| {
            let (name, ty) = (f.wire(), f.kind());
            json!({
                "name": name, "in": "query", "required": false,
                "description": format!(
                    "filter ({ty:?}); also {name}__OP with OP one of eq, ne, lt, le, gt, ge, contains, in, notin; repeat for any of"
                ),
                "schema": {"type": "string"}
            })
        })
        .collect();
    params.push(json!({"name": "order", "in": "query", "description": "a field, - for descending; repeat for more keys", "schema": {"type": "string"}}));
    params
        .push(json!({"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}}));
    params.push(
        json!({"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}}),
    );
    params.push(json!({"name": "field", "in": "query", "description": "fields to keep in each result; repeat", "schema": {"type": "string"}}));
    params
}

fn path_param(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "description": description, "schema": {"type": "string"}})
}

fn list<F: Collection>(summary: &str, path_params: &[Value]) -> Value {
    let mut params = path_params.to_vec();
    params.extend(collection_params::<F>());
    let plural = F::PLURAL;
    json!({"get": {
        "summary": summary,
        "parameters": params,
        "responses": {
            "200": {"description": format!("{{\"{plural}\": [...], \"meta\": {{\"total\": N}}}}: the total counts every match before paging"),
                    "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{plural}")}}}},
            "400": error_responses()["400"].clone(),
        }
    }})
}

fn get(summary: &str, path_params: &[Value]) -> Value {
    let mut responses = error_responses();
    responses["200"] = json!({"description": "OK"});
    json!({"get": {"summary": summary, "parameters": path_params, "responses": responses}})
}

fn rpc(methods: &str, path_params: &[Value]) -> Value {
    json!({
        "summary": format!("JSON-RPC 2.0 control action: {methods}; needs the bearer token"),
        "parameters": path_params,
        "security": [{"bearer": []}],
        "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Rpc"}}}},
        "responses": {
            "200": {"description": "{\"jsonrpc\": \"2.0\", \"result\": ..., \"id\": ...}"},
            "400": {"description": "unknown method or bad params"},
            "401": {"description": "no or wrong token"},
            "404": {"description": "no such entity"},
            "409": {"description": "the entity's state forbids it (already complete, ...)"},
        }
    })
}

fn entity_schema(fields: &[&str]) -> Value {
    let props: Map<String, Value> = fields
        .iter()
        .map(|f| ((*f).to_owned(), json!({})))
        .collect();
    json!({"type": "object", "properties": props})
}

fn collection_schema(plural: &str, fields: &[&str]) -> Value {
    json!({"type": "object", "properties": {
        plural: {"type": "array", "items": entity_schema(fields)},
        "meta": {"type": "object", "properties": {"total": {"type": "integer"}}},
    }})
}

/// The document.
pub fn spec() -> Value {
    let id = |what: &str| path_param("id", what);
    let mut paths = Map::new();
    let mut buildsets = list::<BuildsetField>("buildsets, newest last unless ordered", &[]);
    buildsets["post"] = json!({
        "summary": "submit a buildset: one request per builder; needs the bearer token",
        "security": [{"bearer": []}],
        "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Submission"}}}},
        "parameters": [{"name": "Idempotency-Key", "in": "header", "required": false, "description": "makes the submit idempotent (as the body's idempotency_key): while a buildset with the key exists, it is answered with 200 and nothing is added", "schema": {"type": "string"}}],
        "responses": {"201": {"description": "{\"bsid\": N, \"brids\": {builder: id}, \"existing\": false, \"unserved\": [builders no active master runs]}"}, "200": {"description": "the buildset holding the idempotency key: {\"bsid\": N, \"brids\": {...}, \"existing\": true}"}, "400": {"description": "bad submission or unknown builder"}, "401": {"description": "no or wrong token"}}
    });
    paths.insert("/buildsets".into(), buildsets);
    let mut one = get(
        "a buildset with its sourcestamps and properties",
        &[id("buildset id")],
    );
    one["post"] = rpc(
        "cancel, resubmit {all}, delete (a complete buildset with its builds)",
        &[id("buildset id")],
    );
    paths.insert("/buildsets/{id}".into(), one);
    paths.insert(
        "/buildsets/{id}/properties".into(),
        get(
            "a buildset's properties: name -> [value, source]",
            &[id("buildset id")],
        ),
    );
    paths.insert(
        "/buildsets/{id}/sourcestamps".into(),
        get("a buildset's sourcestamps", &[id("buildset id")]),
    );
    paths.insert(
        "/buildsets/{id}/buildrequests".into(),
        list::<RequestField>("a buildset's requests", &[id("buildset id")]),
    );
    paths.insert(
        "/buildsets/{id}/builds".into(),
        list::<BuildField>("a buildset's builds", &[id("buildset id")]),
    );
    paths.insert(
        "/buildsets/{id}/tree".into(),
        get(
            "a buildset, its builds, and the buildsets they triggered, recursively",
            &[id("buildset id")],
        ),
    );
    let mut stamps = get(
        "stored sourcestamps by id (identical stamps stored once)",
        &[],
    );
    if let Some(params) = stamps["get"]["parameters"].as_array_mut() {
        params.push(
            json!({"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}}),
        );
        params.push(
            json!({"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}}),
        );
    }
    paths.insert("/sourcestamps".into(), stamps);
    paths.insert(
        "/sourcestamps/{id}".into(),
        get("a sourcestamp", &[id("sourcestamp id")]),
    );
    paths.insert(
        "/buildrequests".into(),
        list::<RequestField>("build requests", &[]),
    );
    let mut one = get("a build request", &[id("request id")]);
    one["post"] = rpc("cancel, set_priority {priority}", &[id("request id")]);
    paths.insert("/buildrequests/{id}".into(), one);
    paths.insert(
        "/buildrequests/{id}/builds".into(),
        list::<BuildField>("a request's builds", &[id("request id")]),
    );
    paths.insert("/builds".into(), list::<BuildField>("builds", &[]));
    let mut one = get("a build with its properties", &[id("build id")]);
    one["post"] = rpc(
        "stop, rebuild, delete (a finished build)",
        &[id("build id")],
    );
    paths.insert("/builds/{id}".into(), one);
    paths.insert(
        "/builds/{id}/properties".into(),
        get("a build's properties", &[id("build id")]),
    );
    let mut logs = get("a build's log records, oldest first", &[id("build id")]);
    if let Some(params) = logs["get"]["parameters"].as_array_mut() {
        params.push(json!({"name": "level", "in": "query", "description": "debug, info, warning, error or critical: this level and above", "schema": {"type": "string"}}));
        params.push(json!({"name": "after", "in": "query", "description": "only records after this record id (a live tail)", "schema": {"type": "integer"}}));
        params.push(json!({"name": "limit", "in": "query", "schema": {"type": "integer"}}));
    }
    paths.insert("/builds/{id}/logs".into(), logs);
    paths.insert(
        "/builds/{id}/log.txt".into(),
        get(
            "the whole log as plain text to download (TIME LEVEL message per line)",
            &[id("build id")],
        ),
    );
    paths.insert(
        "/builds/{id}/progress".into(),
        get("a build's progress tree", &[id("build id")]),
    );
    paths.insert(
        "/builds/{id}/artifacts".into(),
        get(
            "the files a build left in its result directory, with download URLs",
            &[id("build id")],
        ),
    );
    paths.insert(
        "/builds/{id}/artifacts/{path}".into(),
        get(
            "one artifact's content",
            &[id("build id"), path_param("path", "the artifact's path")],
        ),
    );
    paths.insert(
        "/builds/{id}/triggered".into(),
        list::<BuildsetField>("the buildsets a build triggered", &[id("build id")]),
    );
    paths.insert(
        "/builders".into(),
        list::<BuilderField>(
            "builders with their status and latest successful build",
            &[],
        ),
    );
    let mut one = get(
        "a builder, by id or name",
        &[path_param("builder", "id or name")],
    );
    one["post"] = rpc(
        "pause (no master claims its requests; running builds finish), resume",
        &[path_param("builder", "id or name")],
    );
    paths.insert("/builders/{builder}".into(), one);
    paths.insert(
        "/builders/{builder}/buildrequests".into(),
        list::<RequestField>(
            "a builder's build requests",
            &[path_param("builder", "id or name")],
        ),
    );
    paths.insert(
        "/builds/{id}/previous_successful_build".into(),
        get(
            "the latest earlier build of the same builder with exactly SUCCESS and the same sourcestamps (zero or one)",
            &[id("build id")],
        ),
    );
    paths.insert(
        "/builders/{builder}/builds".into(),
        list::<BuildField>("a builder's builds", &[path_param("builder", "id or name")]),
    );
    paths.insert(
        "/builders/{builder}/builds/{number}".into(),
        get(
            "a build by builder and number",
            &[
                path_param("builder", "id or name"),
                path_param("number", "the build number"),
            ],
        ),
    );
    paths.insert(
        "/schedules".into(),
        get(
            "schedules with their timing, last and next fire (not paged)",
            &[],
        ),
    );
    paths.insert(
        "/locks".into(),
        get(
            "locks with their count, holding builds, taking builders and waiting requests (not paged)",
            &[],
        ),
    );
    let mut one = get("a schedule", &[path_param("name", "the schedule's name")]);
    one["post"] = rpc(
        "force (fire now, whatever its timing)",
        &[path_param("name", "the schedule's name")],
    );
    paths.insert("/schedules/{name}".into(), one);
    paths.insert(
        "/masters".into(),
        list::<MasterField>("masters (engine processes)", &[]),
    );
    paths.insert("/masters/{id}".into(), get("a master", &[id("master id")]));
    paths.insert("/plugins".into(), json!({"post": {
        "summary": "upload a plugin component (?name=NAME, the .wasm as the body); accepted only if it fits one of Kiln's worlds; needs the bearer token",
        "security": [{"bearer": []}],
        "requestBody": {"required": true, "content": {"application/wasm": {}}},
        "responses": {"201": {"description": "{\"name\", \"world\", \"package_versions\", \"size\"}"}, "400": {"description": "not a Kiln plugin, with the reasons"}, "401": {"description": "no or wrong token"}}
    }}));
    paths.insert("/events".into(), json!({"get": {
        "summary": "server-sent events: lifecycle events, build log and progress updates; named by kind",
        "responses": {"200": {"description": "text/event-stream"}}
    }}));
    paths.insert("/openapi.json".into(), get("this document", &[]));
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Kiln data API", "version": "2", "description": "Buildbot's data API shape: collections answer {\"<plural>\": [...], \"meta\": {\"total\": N}}; times are seconds since the Unix epoch; results are Buildbot's numbers (SUCCESS 0 .. CANCELLED 6)."},
        "servers": [{"url": crate::PREFIX}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "string"}}},
                "Rpc": {"type": "object", "required": ["method"], "properties": {"jsonrpc": {"const": "2.0"}, "method": {"type": "string"}, "params": {"type": "object"}, "id": {}}},
                "Submission": {"type": "object", "required": ["builders"], "properties": {
                    "reason": {"type": "string"}, "builders": {"type": "array", "items": {"type": "string"}},
                    "properties": {"type": "object", "description": "name -> value, or name -> [value, source]"},
                    "sourcestamps": {"type": "array", "items": {"type": "object"}},
                    "priority": {"type": "integer", "minimum": -1000, "maximum": 1000},
                    "external_idstring": {"type": "string"},
                    "idempotency_key": {"type": "string", "description": "as the Idempotency-Key header"},
                    "not_before": {"type": "number", "description": "a delayed run: not claimable before this time (seconds since the epoch)"},
                    "delay": {"type": "number", "minimum": 0, "description": "a delayed run: not claimable for this many seconds"}}},
                "buildsets": collection_schema("buildsets", shapes::BUILDSET_FIELDS),
                "buildrequests": collection_schema("buildrequests", shapes::REQUEST_FIELDS),
                "builds": collection_schema("builds", shapes::BUILD_FIELDS),
                "builders": collection_schema("builders", shapes::BUILDER_FIELDS),
                "masters": collection_schema("masters", shapes::MASTER_FIELDS),
            }
        }
    })
}

pub async fn document() -> Json<Value> {
    Json(spec())
}
