//! `GET /api/v2/openapi.json`: an OpenAPI 3.1 document of the whole API. The response
//! schemas come from the wire types the handlers serialise (`crate::wire`, through
//! utoipa's `ToSchema`), the filters from the same field tables the query parser checks
//! against, so that neither can drift; a test validates the document and checks real
//! answers against it.

use axum::Json;
use kiln_engine::storage::{BuildField, BuilderField, BuildsetField, MasterField, RequestField};
use serde_json::{Map, Value, json};
use utoipa::ToSchema;

use crate::query::Collection;
use crate::wire;

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn json_content(schema: Value) -> Value {
    json!({"application/json": {"schema": schema}})
}

fn error(description: &str) -> Value {
    json!({"description": description, "content": json_content(schema_ref("Error"))})
}

fn rpc_error(description: &str) -> Value {
    json!({"description": description, "content": json_content(schema_ref("RpcError"))})
}

fn error_responses() -> Value {
    json!({
        "400": error("bad request: an unknown parameter, field or operator, a bad value, or a filter on a single entity"),
        "401": error("reads are private and the token is missing or wrong"),
        "404": error("no such entity"),
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
    params.push(json!({"name": "field", "in": "query", "description": "fields to keep in each result; repeat (the answer then holds only those properties)", "schema": {"type": "string"}}));
    params
}

fn path_param(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "description": description, "schema": {"type": "string"}})
}

fn list<F: Collection>(summary: &str, path_params: &[Value]) -> Value {
    let mut params = path_params.to_vec();
    params.extend(collection_params::<F>());
    let plural = F::PLURAL;
    let mut responses = error_responses();
    responses["200"] = json!({
        "description": format!("{{\"{plural}\": [...], \"meta\": {{\"total\": N}}}}: the total counts every match before paging"),
        "content": json_content(schema_ref(plural)),
    });
    json!({"get": {"summary": summary, "parameters": params, "responses": responses}})
}

/// A GET answering `schema` (a component's name).
fn get(summary: &str, path_params: &[Value], schema: &str) -> Value {
    get_as(summary, path_params, json_content(schema_ref(schema)))
}

/// A GET answering `content` (a media type → schema map).
fn get_as(summary: &str, path_params: &[Value], content: Value) -> Value {
    let mut responses = error_responses();
    responses["200"] = json!({"description": "OK", "content": content});
    json!({"get": {"summary": summary, "parameters": path_params, "responses": responses}})
}

fn rpc(methods: &str, path_params: &[Value]) -> Value {
    json!({
        "summary": format!("JSON-RPC 2.0 control action: {methods}; needs the bearer token"),
        "parameters": path_params,
        "security": [{"bearer": []}],
        "requestBody": {"required": true, "content": json_content(schema_ref("Rpc"))},
        "responses": {
            "200": {"description": "the method's result", "content": json_content(schema_ref("RpcReply"))},
            "400": rpc_error("unknown method or bad params"),
            "401": rpc_error("no or wrong token"),
            "404": rpc_error("no such entity"),
            "409": rpc_error("the entity's state forbids it (already complete, ...)"),
        }
    })
}

/// `{"<plural>": [<item>], "meta": {"total": N}}`.
fn collection_schema(plural: &str, item: Value) -> Value {
    json!({"type": "object", "required": [plural, "meta"], "properties": {
        plural: {"type": "array", "items": item},
        "meta": schema_ref("Meta"),
    }})
}

/// Adds `T` and every schema it refers to.
fn component<T: ToSchema>(schemas: &mut Map<String, Value>) {
    let mut nested = Vec::new();
    T::schemas(&mut nested);
    for (name, schema) in nested {
        schemas.insert(name, serde_json::to_value(schema).unwrap_or(Value::Null));
    }
    schemas.insert(
        T::name().into_owned(),
        serde_json::to_value(T::schema()).unwrap_or(Value::Null),
    );
}

fn schemas() -> Map<String, Value> {
    let mut schemas = Map::new();
    component::<wire::Buildset>(&mut schemas);
    component::<wire::BuildsetState>(&mut schemas);
    component::<wire::Properties>(&mut schemas);
    component::<wire::SourceStamp>(&mut schemas);
    component::<wire::BuildRequest>(&mut schemas);
    component::<wire::Build>(&mut schemas);
    component::<wire::BuilderStatus>(&mut schemas);
    component::<wire::Builder>(&mut schemas);
    component::<wire::Master>(&mut schemas);
    component::<wire::Schedule>(&mut schemas);
    component::<wire::Lock>(&mut schemas);
    component::<wire::LockHolder>(&mut schemas);
    component::<wire::LockUser>(&mut schemas);
    component::<wire::LogRecord>(&mut schemas);
    component::<wire::Artifact>(&mut schemas);
    component::<wire::Error>(&mut schemas);
    component::<wire::SubmitReply>(&mut schemas);
    component::<wire::RpcReply>(&mut schemas);
    component::<wire::RpcError>(&mut schemas);
    component::<wire::StreamEvent>(&mut schemas);
    component::<wire::Reporter>(&mut schemas);
    component::<wire::Meta>(&mut schemas);
    for (plural, item) in [
        ("buildsets", "Buildset"),
        ("buildrequests", "BuildRequest"),
        ("builds", "Build"),
        ("builders", "Builder"),
        ("masters", "Master"),
        ("schedules", "Schedule"),
        ("locks", "Lock"),
        ("reporters", "Reporter"),
        ("logs", "LogRecord"),
        ("sourcestamps", "SourceStamp"),
        ("artifacts", "Artifact"),
        ("properties", "Properties"),
    ] {
        schemas.insert(plural.into(), collection_schema(plural, schema_ref(item)));
    }
    schemas.insert(
        "progress".into(),
        collection_schema(
            "progress",
            json!({"type": "object", "description": "a progress group: name, current, total, status and children (the same, recursively)"}),
        ),
    );
    schemas.insert(
        "tree".into(),
        json!({"type": "object", "required": ["tree", "truncated"], "properties": {
            "tree": {"type": "object", "description": "the buildset with its builds, each with the buildsets it triggered, recursively"},
            "truncated": {"type": "boolean", "description": "whether the tree was cut at max_tree_nodes"},
        }}),
    );
    schemas.insert("Rpc".into(), json!({"type": "object", "required": ["method"], "properties": {"jsonrpc": {"const": "2.0"}, "method": {"type": "string"}, "params": {"type": "object"}, "id": {}}}));
    schemas.insert("Submission".into(), json!({"type": "object", "required": ["builders"], "properties": {
        "reason": {"type": "string"}, "builders": {"type": "array", "items": {"type": "string"}},
        "properties": {"type": "object", "description": "name -> value, or name -> [value, source]"},
        "sourcestamps": {"type": "array", "items": schema_ref("SourceStamp")},
        "priority": {"type": "integer", "minimum": -1000, "maximum": 1000},
        "external_idstring": {"type": "string"},
        "idempotency_key": {"type": "string", "description": "as the Idempotency-Key header"},
        "not_before": {"type": "number", "description": "a delayed run: not claimable before this time (seconds since the epoch)"},
        "delay": {"type": "number", "minimum": 0, "description": "a delayed run: not claimable for this many seconds"}}}));
    schemas
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
        "responses": {"201": {"description": "a new buildset", "content": json_content(schema_ref("SubmitReply"))}, "200": {"description": "the buildset holding the idempotency key (existing: true)", "content": json_content(schema_ref("SubmitReply"))}, "400": error("bad submission or unknown builder"), "401": error("no or wrong token")}
    });
    paths.insert("/buildsets".into(), buildsets);
    let mut one = get(
        "a buildset with its sourcestamps and properties",
        &[id("buildset id")],
        "buildsets",
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
            "properties",
        ),
    );
    paths.insert(
        "/buildsets/{id}/sourcestamps".into(),
        get(
            "a buildset's sourcestamps",
            &[id("buildset id")],
            "sourcestamps",
        ),
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
            "tree",
        ),
    );
    let mut stamps = get(
        "stored sourcestamps by id (identical stamps stored once)",
        &[],
        "sourcestamps",
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
        get("a sourcestamp", &[id("sourcestamp id")], "sourcestamps"),
    );
    paths.insert(
        "/buildrequests".into(),
        list::<RequestField>("build requests", &[]),
    );
    let mut one = get("a build request", &[id("request id")], "buildrequests");
    one["post"] = rpc("cancel, set_priority {priority}", &[id("request id")]);
    paths.insert("/buildrequests/{id}".into(), one);
    paths.insert(
        "/buildrequests/{id}/builds".into(),
        list::<BuildField>("a request's builds", &[id("request id")]),
    );
    paths.insert("/builds".into(), list::<BuildField>("builds", &[]));
    let mut one = get("a build with its properties", &[id("build id")], "builds");
    one["post"] = rpc(
        "stop, rebuild, delete (a finished build)",
        &[id("build id")],
    );
    paths.insert("/builds/{id}".into(), one);
    paths.insert(
        "/builds/{id}/properties".into(),
        get("a build's properties", &[id("build id")], "properties"),
    );
    let mut logs = get(
        "a build's log records, oldest first",
        &[id("build id")],
        "logs",
    );
    if let Some(params) = logs["get"]["parameters"].as_array_mut() {
        params.push(json!({"name": "level", "in": "query", "description": "debug, info, warning, error or critical: this level and above", "schema": {"type": "string"}}));
        params.push(json!({"name": "after", "in": "query", "description": "only records after this record id (a live tail)", "schema": {"type": "integer"}}));
        params.push(json!({"name": "limit", "in": "query", "schema": {"type": "integer"}}));
    }
    paths.insert("/builds/{id}/logs".into(), logs);
    paths.insert(
        "/builds/{id}/log.txt".into(),
        get_as(
            "the whole log as plain text to download (TIME LEVEL message per line)",
            &[id("build id")],
            json!({"text/plain": {"schema": {"type": "string"}}}),
        ),
    );
    paths.insert(
        "/builds/{id}/progress".into(),
        get("a build's progress tree", &[id("build id")], "progress"),
    );
    paths.insert(
        "/builds/{id}/artifacts".into(),
        get(
            "the files a build left in its result directory, with download URLs",
            &[id("build id")],
            "artifacts",
        ),
    );
    paths.insert(
        "/builds/{id}/artifacts/{path}".into(),
        get_as(
            "one artifact's content",
            &[id("build id"), path_param("path", "the artifact's path")],
            json!({"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}),
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
        "builders",
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
            "builds",
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
            "builds",
        ),
    );
    paths.insert(
        "/schedules".into(),
        get(
            "schedules with their timing, last and next fire (not paged)",
            &[],
            "schedules",
        ),
    );
    paths.insert(
        "/reporters".into(),
        get(
            "each reporter's delivery: cursor, lease, attempts, last error, delivered, dropped, pending (not paged)",
            &[],
            "reporters",
        ),
    );
    paths.insert(
        "/locks".into(),
        get(
            "locks with their count, holding builds, taking builders and waiting requests (not paged)",
            &[],
            "locks",
        ),
    );
    let mut one = get(
        "a schedule",
        &[path_param("name", "the schedule's name")],
        "schedules",
    );
    one["post"] = rpc(
        "force (fire now, whatever its timing)",
        &[path_param("name", "the schedule's name")],
    );
    paths.insert("/schedules/{name}".into(), one);
    paths.insert(
        "/masters".into(),
        list::<MasterField>("masters (engine processes)", &[]),
    );
    paths.insert(
        "/masters/{id}".into(),
        get("a master", &[id("master id")], "masters"),
    );
    paths.insert("/plugins".into(), json!({"post": {
        "summary": "upload a plugin component (?name=NAME, the .wasm as the body); accepted only if it fits one of Kiln's worlds; needs the bearer token",
        "security": [{"bearer": []}],
        "requestBody": {"required": true, "content": {"application/wasm": {}}},
        "responses": {"201": {"description": "the stored plugin", "content": json_content(json!({"type": "object", "required": ["name", "world", "size"], "properties": {"name": {"type": "string"}, "world": {"type": "string"}, "package_versions": {"type": "array", "items": {"type": "string"}}, "size": {"type": "integer"}}}))}, "400": error("not a Kiln plugin, with the reasons"), "401": error("no or wrong token")}
    }}));
    paths.insert("/events".into(), json!({"get": {
        "summary": "server-sent events in the API's vocabulary (data: a StreamEvent), named by kind and numbered; send Last-Event-ID (or last_event_id=) to resume after the last one seen",
        "parameters": [
            {"name": "Last-Event-ID", "in": "header", "required": false, "description": "resume after this event", "schema": {"type": "integer"}},
            {"name": "last_event_id", "in": "query", "required": false, "description": "as Last-Event-ID, for clients that cannot set headers", "schema": {"type": "integer"}},
            {"name": "access_token", "in": "query", "required": false, "description": "the token, where reads are private (EventSource cannot send headers)", "schema": {"type": "string"}},
        ],
        "responses": {"200": {"description": "the event stream", "content": {"text/event-stream": {"schema": {"type": "string"}}}}}
    }}));
    paths.insert(
        "/openapi.json".into(),
        get_as(
            "this document",
            &[],
            json_content(json!({"type": "object"})),
        ),
    );
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Kiln data API", "version": "2", "description": "Buildbot's data API shape: collections answer {\"<plural>\": [...], \"meta\": {\"total\": N}}; times are seconds since the Unix epoch; results are Buildbot's numbers (SUCCESS 0 .. CANCELLED 6)."},
        "servers": [{"url": crate::PREFIX}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas(),
        }
    })
}

pub async fn document() -> Json<Value> {
    Json(spec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json as shapes;

    #[test]
    fn every_selectable_field_is_a_property_of_its_wire_schema_and_back() {
        let schemas = schemas();
        for (fields, name) in [
            (shapes::BUILDSET_FIELDS, "Buildset"),
            (shapes::REQUEST_FIELDS, "BuildRequest"),
            (shapes::BUILD_FIELDS, "Build"),
            (shapes::BUILDER_FIELDS, "Builder"),
            (shapes::MASTER_FIELDS, "Master"),
            (shapes::SCHEDULE_FIELDS, "Schedule"),
            (shapes::LOCK_FIELDS, "Lock"),
            (shapes::REPORTER_FIELDS, "Reporter"),
        ] {
            let mut declared: Vec<&str> = schemas[name]["properties"]
                .as_object()
                .map(|p| p.keys().map(String::as_str).collect())
                .unwrap_or_default();
            declared.sort_unstable();
            let mut selectable = fields.to_vec();
            selectable.sort_unstable();
            assert_eq!(declared, selectable, "{name}");
            // Typed: no property is left as "anything" unless it holds free JSON.
            for (property, schema) in schemas[name]["properties"]
                .as_object()
                .into_iter()
                .flatten()
            {
                assert!(
                    schema.as_object().is_some_and(|s| !s.is_empty()),
                    "{name}.{property} has no type"
                );
            }
        }
    }
}
