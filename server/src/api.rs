//! The read endpoints.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use kiln_engine::model::{
    Build, BuildId, Builder, Buildset, BuildsetId, LogLevel, LogQuery, MasterId, RequestId,
};
use kiln_engine::storage::{
    BuildField, BuilderField, BuildsetField, FilterValue, MasterField, Op, Page, Query,
    RequestField,
};
use serde_json::{Value, json};

use crate::AppState;
use crate::control::authorize;
use crate::error::{ApiError, ApiResult};
use crate::json::{self, id};
use crate::query::{Collection, pairs, parse_collection, parse_entity};

type Reply = ApiResult<Json<Value>>;

/// How deep `/buildsets/{id}/tree` follows children.
const TREE_DEPTH: usize = 8;

/// Refuses a read without the token when reads are private.
pub(crate) fn authorize_read(state: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    if state.config.private_reads {
        authorize(state, headers)?;
    }
    Ok(())
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint; see /api/v2/openapi.json".into())
}

/// A page of entities as a collection response.
fn page_reply<F: Collection, T>(
    page: &Page<T>,
    render: fn(&T) -> Value,
    fields: &[String],
) -> Reply {
    let items = page.items.iter().map(render).collect();
    Ok(Json(json::collection(
        F::PLURAL,
        items,
        total(page),
        fields,
    )))
}

/// The total of a counted page.
fn total<T>(page: &Page<T>) -> u64 {
    page.total.unwrap_or(page.items.len() as u64)
}

/// A small, unpaged collection (schedules, reporters, locks: a handful per database),
/// with `field=` selection.
fn unpaged<T>(plural: &str, items: &[T], render: fn(&T) -> Value, fields: &[String]) -> Reply {
    Ok(Json(json::collection(
        plural,
        items.iter().map(render).collect(),
        items.len() as u64,
        fields,
    )))
}

// ---- buildsets ----

pub async fn buildsets(
    State(s): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    let q = parse_collection::<BuildsetField>(raw.as_deref(), json::BUILDSET_FIELDS, s.paging())?;
    let page = s.engine.client().query_buildsets(&q.query).await?;
    let running = running_buildsets(&s, &page.items).await?;
    let items = page
        .items
        .iter()
        .map(|b| with_state(json::buildset(b), b, &running))
        .collect();
    Ok(Json(json::collection(
        BuildsetField::PLURAL,
        items,
        total(&page),
        &q.fields,
    )))
}

/// Of these buildsets, the incomplete ones with a request some master holds: one
/// query per page.
async fn running_buildsets(
    s: &AppState,
    buildsets: &[kiln_engine::model::Buildset],
) -> ApiResult<std::collections::BTreeSet<BuildsetId>> {
    let open: Vec<kiln_engine::storage::FilterValue> = buildsets
        .iter()
        .filter(|b| !b.complete)
        .map(|b| b.id.0.into())
        .collect();
    if open.is_empty() {
        return Ok(Default::default());
    }
    let mut q = kiln_engine::storage::Query::new()
        .eq(RequestField::Complete, false)
        .eq(RequestField::Claimed, true);
    q.filters.push(kiln_engine::storage::Filter {
        field: RequestField::BuildsetId,
        op: kiln_engine::storage::Op::Eq,
        values: open,
    });
    Ok(s.engine
        .client()
        .query_requests(&q)
        .await?
        .items
        .iter()
        .map(|r| r.buildset_id)
        .collect())
}

/// A buildset with its `state`: `complete`, `running` (a master holds one of its
/// requests) or `queued` (nothing of it runs yet: waiting for a master, a delay or a
/// paused builder).
fn with_state(
    mut value: Value,
    b: &kiln_engine::model::Buildset,
    running: &std::collections::BTreeSet<BuildsetId>,
) -> Value {
    value["state"] = json!(if b.complete {
        "complete"
    } else if running.contains(&b.id) {
        "running"
    } else {
        "queued"
    });
    value
}

pub async fn buildset(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(bsid): Path<String>,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    let fields = parse_entity(raw.as_deref(), json::BUILDSET_FIELDS)?;
    let id = BuildsetId(id("buildset", &bsid)?);
    let client = s.engine.client();
    let bs = client.buildset(id).await?;
    let running = running_buildsets(&s, std::slice::from_ref(&bs)).await?;
    let mut value = with_state(json::buildset(&bs), &bs, &running);
    value["sourcestamps"] = json::sourcestamps(&client.buildset_sourcestamps(id).await?);
    value["properties"] = json::properties(&client.buildset_properties(id).await?);
    Ok(Json(json::entity("buildsets", value, &fields)))
}

pub async fn buildset_properties(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(bsid): Path<String>,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    parse_entity(raw.as_deref(), &[])?;
    let props = s
        .engine
        .client()
        .buildset_properties(BuildsetId(id("buildset", &bsid)?))
        .await?;
    Ok(Json(
        json!({ "properties": [json::properties(&props)], "meta": {"total": 1} }),
    ))
}

/// `GET /sourcestamps`: the stored sourcestamps by id (identical stamps are stored
/// once), paged with `limit` and `offset`.
pub async fn sourcestamps(
    State(s): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    let paging = s.paging();
    let mut limit = paging.default;
    let mut offset = 0;
    for (key, value) in crate::query::pairs(raw.as_deref())? {
        let n = || {
            value.parse::<u32>().map_err(|_| {
                ApiError::BadRequest(format!("{key}={value:?}: expected a whole number ≥ 0"))
            })
        };
        match key.as_str() {
            "limit" => {
                limit = n()?;
                if limit == 0 || limit > paging.max {
                    return Err(ApiError::BadRequest(format!(
                        "limit={limit}: 1 to {} sourcestamps per page",
                        paging.max
                    )));
                }
            }
            "offset" => offset = n()?,
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "unknown parameter {key:?}: sourcestamps take limit and offset"
                )));
            }
        }
    }
    let (stamps, total) = s.engine.client().sourcestamps(limit, offset).await?;
    let items = stamps
        .iter()
        .map(|(id, stamp)| json::sourcestamp(*id, stamp))
        .collect();
    Ok(Json(json::collection("sourcestamps", items, total, &[])))
}

/// `GET /sourcestamps/{id}`.
pub async fn sourcestamp(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(ssid): Path<String>,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    parse_entity(raw.as_deref(), &[])?;
    let id = kiln_engine::model::SourceStampId(id("sourcestamp", &ssid)?);
    let stamp = s.engine.client().sourcestamp(id).await?;
    Ok(Json(json::entity(
        "sourcestamps",
        json::sourcestamp(id, &stamp),
        &[],
    )))
}

pub async fn buildset_sourcestamps(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(bsid): Path<String>,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    parse_entity(raw.as_deref(), &[])?;
    let stamps = s
        .engine
        .client()
        .buildset_sourcestamps(BuildsetId(id("buildset", &bsid)?))
        .await?;
    let total = stamps.len();
    Ok(Json(
        json!({ "sourcestamps": json::sourcestamps(&stamps), "meta": {"total": total} }),
    ))
}

pub async fn buildset_requests(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(bsid): Path<String>,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    let bsid = id("buildset", &bsid)?;
    s.engine.client().buildset(BuildsetId(bsid)).await?;
    let q = parse_collection::<RequestField>(raw.as_deref(), json::REQUEST_FIELDS, s.paging())?;
    let page = s
        .engine
        .client()
        .query_requests(&q.query.eq(RequestField::BuildsetId, BuildsetId(bsid)))
        .await?;
    page_reply::<RequestField, _>(&page, json::request, &q.fields)
}

pub async fn buildset_builds(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(bsid): Path<String>,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    let bsid = id("buildset", &bsid)?;
    s.engine.client().buildset(BuildsetId(bsid)).await?;
    builds_where(&s, raw.as_deref(), |q| {
        q.eq(BuildField::BuildsetId, BuildsetId(bsid))
    })
    .await
}

/// A buildset with its builds and, under each build, the buildsets it triggered, down
/// to [`TREE_DEPTH`] levels and at most `max_tree_nodes` nodes (buildsets and builds); a
/// larger tree is cut and says so with `"truncated": true`. Three queries per level,
/// however wide the level.
pub async fn buildset_tree(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(bsid): Path<String>,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    parse_entity(raw.as_deref(), &[])?;
    let root = s
        .engine
        .client()
        .buildset(BuildsetId(id("buildset", &bsid)?))
        .await?;
    let names = builder_names(&s).await?;
    let max = s.config.max_tree_nodes.max(1);
    let client = s.engine.client();
    let mut tree = Tree::default();
    let mut nodes = 1;
    let mut truncated = false;
    let mut level = vec![root.id.0];
    for depth in 0..=TREE_DEPTH {
        // The level's requests tell which buildset each build belongs to.
        let requests = client
            .query_requests(&within(
                RequestField::BuildsetId,
                &level,
                RequestField::Id,
                usize::MAX,
            ))
            .await?;
        let buildset_of: BTreeMap<i64, i64> = requests
            .items
            .iter()
            .map(|r| (r.id.0, r.buildset_id.0))
            .collect();
        let room = max.saturating_sub(nodes);
        let builds = client
            .query_builds(&within(
                BuildField::BuildsetId,
                &level,
                BuildField::Id,
                room,
            ))
            .await?;
        if room == 0 {
            truncated |= total(&builds) > 0;
            break;
        }
        truncated |= total(&builds) > builds.items.len() as u64;
        nodes += builds.items.len();
        let build_ids: Vec<i64> = builds.items.iter().map(|b| b.id.0).collect();
        for b in builds.items {
            let buildset = buildset_of
                .get(&b.request_id.0)
                .copied()
                .unwrap_or_default();
            tree.builds.entry(buildset).or_default().push(b);
        }
        if build_ids.is_empty() {
            break;
        }
        let room = max.saturating_sub(nodes);
        let children = client
            .query_buildsets(&within(
                BuildsetField::ParentBuildId,
                &build_ids,
                BuildsetField::Id,
                room,
            ))
            .await?;
        if depth == TREE_DEPTH || room == 0 {
            truncated |= total(&children) > 0;
            break;
        }
        truncated |= total(&children) > children.items.len() as u64;
        nodes += children.items.len();
        level = children.items.iter().map(|c| c.id.0).collect();
        for child in children.items {
            if let Some(parent) = child.parent_buildid {
                tree.children.entry(parent.0).or_default().push(child);
            }
        }
        if level.is_empty() {
            break;
        }
    }
    Ok(Json(
        json!({ "tree": tree.node(&root, &names), "truncated": truncated }),
    ))
}

/// A query for the items whose `field` is one of `ids`, by `order`, at most `limit`
/// (asking for one when there is no room: the total still says whether any exist).
fn within<F: Collection>(field: F, ids: &[i64], order: F, limit: usize) -> Query<F> {
    let mut query = Query::new()
        .counted()
        .order_by(order, false)
        .limit(u32::try_from(limit.max(1)).unwrap_or(u32::MAX));
    query.filters.push(kiln_engine::storage::Filter {
        field,
        op: Op::In,
        values: ids.iter().map(|id| FilterValue::Int(*id)).collect(),
    });
    query
}

/// The builds of each buildset and the children of each build, read level by level.
#[derive(Default)]
struct Tree {
    builds: BTreeMap<i64, Vec<Build>>,
    children: BTreeMap<i64, Vec<Buildset>>,
}

impl Tree {
    /// A buildset node with its builds and, under each, its children.
    fn node(&self, bs: &Buildset, names: &BTreeMap<i64, String>) -> Value {
        let builds: Vec<Value> = self
            .builds
            .get(&bs.id.0)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|b| {
                let mut node = json::build(b);
                node["builder"] = json!(names.get(&b.builder_id.0));
                let children: Vec<Value> = self
                    .children
                    .get(&b.id.0)
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(|child| self.node(child, names))
                    .collect();
                node["children"] = Value::Array(children);
                node
            })
            .collect();
        let mut value = json::buildset(bs);
        value["builds"] = Value::Array(builds);
        value
    }
}

async fn builder_names(s: &AppState) -> ApiResult<BTreeMap<i64, String>> {
    Ok(s.engine
        .client()
        .builders()
        .await?
        .into_iter()
        .map(|b| (b.id.0, b.name))
        .collect())
}

// ---- build requests ----

pub async fn requests(
    State(s): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    let q = parse_collection::<RequestField>(raw.as_deref(), json::REQUEST_FIELDS, s.paging())?;
    let page = s.engine.client().query_requests(&q.query).await?;
    page_reply::<RequestField, _>(&page, json::request, &q.fields)
}

pub async fn request(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(rid): Path<String>,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    let fields = parse_entity(raw.as_deref(), json::REQUEST_FIELDS)?;
    let r = s
        .engine
        .client()
        .request(RequestId(id("build request", &rid)?))
        .await?;
    Ok(Json(json::entity(
        "buildrequests",
        json::request(&r),
        &fields,
    )))
}

pub async fn request_builds(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(rid): Path<String>,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    let rid = id("build request", &rid)?;
    s.engine.client().request(RequestId(rid)).await?;
    builds_where(&s, raw.as_deref(), |q| {
        q.eq(BuildField::RequestId, RequestId(rid))
    })
    .await
}

// ---- builds ----

/// A builds collection request: the query, and the properties to show with each build
/// (Buildbot's `property=NAME`, repeatable; `property=*` for all of them).
fn parse_builds(
    raw: Option<&str>,
    paging: crate::query::Paging,
) -> ApiResult<(crate::query::CollectionQuery<BuildField>, Vec<String>)> {
    let mut properties = Vec::new();
    let mut rest = Vec::new();
    for part in raw.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        match crate::query::pairs(Some(part))?.pop() {
            Some((key, value)) if key == "property" => properties.push(value),
            _ => rest.push(part),
        }
    }
    let rest = rest.join("&");
    let q = parse_collection::<BuildField>(Some(&rest), json::BUILD_FIELDS, paging)?;
    Ok((q, properties))
}

/// A builds collection request, narrowed by `narrow` (to a buildset, request or
/// builder).
async fn builds_where(
    s: &AppState,
    raw: Option<&str>,
    narrow: impl FnOnce(Query<BuildField>) -> Query<BuildField>,
) -> Reply {
    let (q, properties) = parse_builds(raw, s.paging())?;
    builds_page(s, narrow(q.query), &q.fields, &properties).await
}

async fn builds_page(
    s: &AppState,
    query: Query<BuildField>,
    fields: &[String],
    properties: &[String],
) -> Reply {
    let page = s.engine.client().query_builds(&query).await?;
    if properties.is_empty() {
        return page_reply::<BuildField, _>(&page, json::build, fields);
    }
    let all = properties.iter().any(|p| p == "*");
    let mut items = Vec::with_capacity(page.items.len());
    for build in &page.items {
        let mut value = json::build(build);
        let mut props = s.engine.client().build_properties(build.id).await?;
        if !all {
            props.retain(|name, _| properties.contains(name));
        }
        value["properties"] = json::properties(&props);
        items.push(json::select(value, fields));
    }
    Ok(Json(
        json!({ BuildField::PLURAL: items, "meta": { "total": page.total.unwrap_or(page.items.len() as u64) } }),
    ))
}

pub async fn builds(
    State(s): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    builds_where(&s, raw.as_deref(), |q| q).await
}

async fn build_reply(s: &AppState, build: kiln_engine::model::Build, fields: &[String]) -> Reply {
    let mut value = json::build(&build);
    value["properties"] = json::properties(&s.engine.client().build_properties(build.id).await?);
    Ok(Json(json::entity("builds", value, fields)))
}

pub async fn build(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(bid): Path<String>,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    let fields = parse_entity(raw.as_deref(), json::BUILD_FIELDS)?;
    let b = s.engine.client().build(BuildId(id("build", &bid)?)).await?;
    build_reply(&s, b, &fields).await
}

pub async fn build_properties(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(bid): Path<String>,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    parse_entity(raw.as_deref(), &[])?;
    let build = BuildId(id("build", &bid)?);
    let props = s.engine.client().build_properties(build).await?;
    Ok(Json(
        json!({ "properties": [json::properties(&props)], "meta": {"total": 1} }),
    ))
}

/// `?level=warning` (at least), `?after=<record id>` (for a live tail), `?limit=N`.
pub async fn build_logs(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(bid): Path<String>,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    let build = BuildId(id("build", &bid)?);
    let mut query = LogQuery {
        build_id: Some(build),
        limit: Some(s.config.max_log_records),
        ..LogQuery::default()
    };
    for (key, value) in pairs(raw.as_deref())? {
        match key.as_str() {
            "level" => {
                query.min_level = Some(
                    value
                        .parse::<LogLevel>()
                        .map_err(|e| ApiError::BadRequest(format!("level={value:?}: {e}")))?,
                )
            }
            "after" => {
                query.after_id = Some(value.parse().map_err(|_| {
                    ApiError::BadRequest(format!("after={value:?}: expected a record id"))
                })?)
            }
            "limit" => {
                let n: u32 = value.parse().map_err(|_| {
                    ApiError::BadRequest(format!("limit={value:?}: expected a whole number"))
                })?;
                let max = s.config.max_log_records;
                if n == 0 || n > max {
                    return Err(ApiError::BadRequest(format!(
                        "limit={n}: between 1 and {max} records per request; read on with after"
                    )));
                }
                query.limit = Some(n);
            }
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "unknown parameter {key:?}: logs take level, after and limit"
                )));
            }
        }
    }
    let client = s.engine.client();
    client.build(build).await?;
    let entries = client.logs(&query).await?;
    let logs: Vec<Value> = entries.iter().map(json::log).collect();
    let total = logs.len();
    Ok(Json(json!({ "logs": logs, "meta": {"total": total} })))
}

/// `GET /builds/{id}/log.txt`: the whole log as plain text to download, one record per
/// line (`TIME LEVEL message {fields}`), read in pages and cut at
/// [`MAX_RAW_LOG_BYTES`](crate::MAX_RAW_LOG_BYTES).
pub async fn build_log_text(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(bid): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<axum::response::Response, ApiError> {
    authorize_read(&s, &headers)?;
    parse_entity(raw.as_deref(), &[])?;
    let build = BuildId(id("build", &bid)?);
    let client = s.engine.client();
    client.build(build).await?;
    let mut text = String::new();
    let mut after = None;
    'pages: loop {
        let page = client
            .logs(&LogQuery {
                build_id: Some(build),
                after_id: after,
                limit: Some(s.config.max_log_records),
                ..LogQuery::default()
            })
            .await?;
        for e in &page {
            let fields = if e.record.fields.is_empty() {
                String::new()
            } else {
                format!(" {}", Value::Object(e.record.fields.clone()))
            };
            let line = format!(
                "{} {:<8} {}{fields}\n",
                e.record
                    .at
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                e.record.level.name().to_uppercase(),
                e.record.message
            );
            if text.len() + line.len() > s.config.max_raw_log_bytes {
                text.push_str(&format!(
                    "[log cut at {} bytes; read the rest with /builds/{}/logs?after={}]\n",
                    s.config.max_raw_log_bytes,
                    build.0,
                    after.unwrap_or_default()
                ));
                break 'pages;
            }
            text.push_str(&line);
            after = Some(e.id);
        }
        if page.len() < s.config.max_log_records as usize {
            break;
        }
    }
    Ok((
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"build-{}.log\"", build.0),
            ),
        ],
        text,
    )
        .into_response())
}

pub async fn build_progress(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(bid): Path<String>,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    parse_entity(raw.as_deref(), &[])?;
    let tree = s
        .engine
        .client()
        .progress(BuildId(id("build", &bid)?))
        .await?;
    Ok(Json(json!({ "progress": [tree], "meta": {"total": 1} })))
}

pub async fn build_artifacts(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(bid): Path<String>,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    parse_entity(raw.as_deref(), &[])?;
    let build = BuildId(id("build", &bid)?);
    let artifacts: Vec<Value> = s
        .engine
        .client()
        .build_artifacts(build)
        .await?
        .into_iter()
        .map(|a| {
            json::value(crate::wire::Artifact {
                url: format!("{}/builds/{}/artifacts/{}", crate::PREFIX, build.0, a.path),
                path: a.path,
                size: i64::try_from(a.size).unwrap_or(i64::MAX),
            })
        })
        .collect();
    let total = artifacts.len();
    Ok(Json(
        json!({ "artifacts": artifacts, "meta": {"total": total} }),
    ))
}

/// The content of one artifact, if it lies on this server.
pub async fn build_artifact_file(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path((bid, path)): Path<(String, String)>,
) -> ApiResult<Response> {
    authorize_read(&s, &headers)?;
    let build = BuildId(id("build", &bid)?);
    // Only paths the database lists are served: nothing else on the disk is reachable.
    let artifact = s
        .engine
        .client()
        .build_artifacts(build)
        .await?
        .into_iter()
        .find(|a| a.path == path)
        .ok_or_else(|| ApiError::NotFound(format!("build {build} has no artifact {path:?}")))?;
    // Streamed, not read into memory; a link is never followed (the engine removes the
    // links a build leaves, and this holds even if one were made later).
    let missing = || {
        ApiError::NotFound(format!(
            "artifact {path:?} of build {build} is not on this server"
        ))
    };
    let file = tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&artifact.location)
        .await
        .map_err(|_| missing())?;
    let meta = file.metadata().await.map_err(|_| missing())?;
    if !meta.is_file() {
        return Err(missing());
    }
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    let kind = match path.rsplit('.').next() {
        Some("json") => "application/json",
        Some("txt" | "log" | "md" | "csv") => "text/plain; charset=utf-8",
        Some("html") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    };
    Ok((
        [
            (header::CONTENT_TYPE, kind.to_owned()),
            (header::CONTENT_LENGTH, meta.len().to_string()),
        ],
        body,
    )
        .into_response())
}

pub async fn build_triggered(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(bid): Path<String>,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    let bid = id("build", &bid)?;
    s.engine.client().build(BuildId(bid)).await?;
    let q = parse_collection::<BuildsetField>(raw.as_deref(), json::BUILDSET_FIELDS, s.paging())?;
    let page = s
        .engine
        .client()
        .query_buildsets(&q.query.eq(BuildsetField::ParentBuildId, BuildId(bid)))
        .await?;
    page_reply::<BuildsetField, _>(&page, json::buildset, &q.fields)
}

// ---- builders ----

async fn builder_value(s: &AppState, b: &Builder) -> ApiResult<Value> {
    let client = s.engine.client();
    let status = client.builder_status(b).await?;
    let latest = client.latest_successful_build(b.id).await?;
    Ok(json::builder(b, status, latest.as_ref()))
}

pub(crate) async fn find_builder(s: &AppState, key: &str) -> ApiResult<Builder> {
    let client = s.engine.client();
    match key.parse::<i64>() {
        Ok(n) => Ok(client.builder(kiln_engine::model::BuilderId(n)).await?),
        Err(_) => Ok(client
            .builder_named(key)
            .await
            .map_err(|_| ApiError::NotFound(format!("builder {key:?} not found")))?),
    }
}

pub async fn builders(
    State(s): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    let q = parse_collection::<BuilderField>(raw.as_deref(), json::BUILDER_FIELDS, s.paging())?;
    let page = s.engine.client().query_builders(&q.query).await?;
    let mut items = Vec::with_capacity(page.items.len());
    for b in &page.items {
        items.push(builder_value(&s, b).await?);
    }
    Ok(Json(json::collection(
        BuilderField::PLURAL,
        items,
        total(&page),
        &q.fields,
    )))
}

pub async fn builder(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(key): Path<String>,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    let fields = parse_entity(raw.as_deref(), json::BUILDER_FIELDS)?;
    let b = find_builder(&s, &key).await?;
    Ok(Json(json::entity(
        "builders",
        builder_value(&s, &b).await?,
        &fields,
    )))
}

pub async fn builder_builds(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(key): Path<String>,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    let b = find_builder(&s, &key).await?;
    builds_where(&s, raw.as_deref(), |q| q.eq(BuildField::BuilderId, b.id)).await
}

/// `GET /builders/{builder}/buildrequests`: the builder's requests, filtered, ordered
/// and paged like `/buildrequests`.
pub async fn builder_requests(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(key): Path<String>,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    let b = find_builder(&s, &key).await?;
    let q = parse_collection::<RequestField>(raw.as_deref(), json::REQUEST_FIELDS, s.paging())?;
    let page = s
        .engine
        .client()
        .query_requests(&q.query.eq(RequestField::BuilderId, b.id))
        .await?;
    page_reply::<RequestField, _>(&page, json::request, &q.fields)
}

/// `GET /builds/{id}/previous_successful_build`: the latest earlier build of the same
/// builder with exactly SUCCESS and the same sourcestamps (Buildbot's
/// `getPrevSuccessfulBuild`), as a collection of zero or one build.
pub async fn build_previous_successful(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(bid): Path<String>,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    let fields = parse_entity(raw.as_deref(), json::BUILD_FIELDS)?;
    let previous = s
        .engine
        .client()
        .previous_successful_build(BuildId(id("build", &bid)?))
        .await?;
    let items: Vec<Value> = previous.iter().map(json::build).collect();
    let total = items.len() as u64;
    Ok(Json(json::collection("builds", items, total, &fields)))
}

pub async fn builder_build(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path((key, number)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    let fields = parse_entity(raw.as_deref(), json::BUILD_FIELDS)?;
    let b = find_builder(&s, &key).await?;
    let number: i64 = number
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("build number {number:?} is not a number")))?;
    let build = s.engine.client().build_of(b.id, number).await?;
    build_reply(&s, build, &fields).await
}

// ---- schedules ----

/// `GET /schedules`: every schedule with its last and next fire (a handful per
/// database: not paged). `field=` selects fields.
pub async fn schedules(
    State(s): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    let fields = parse_entity(raw.as_deref(), json::SCHEDULE_FIELDS)?;
    let all = s.engine.client().schedules().await?;
    unpaged("schedules", &all, json::schedule, &fields)
}

pub async fn schedule(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    let fields = parse_entity(raw.as_deref(), json::SCHEDULE_FIELDS)?;
    let one = s.engine.client().schedule(&name).await?;
    Ok(Json(json::entity(
        "schedules",
        json::schedule(&one),
        &fields,
    )))
}

// ---- reporters ----

/// `GET /reporters`: each reporter's delivery (what `kiln list reporters` shows): its
/// cursor, lease, attempts, last error, and events delivered, dropped and pending.
pub async fn reporters(
    State(s): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    let fields = parse_entity(raw.as_deref(), json::REPORTER_FIELDS)?;
    let all = s.engine.client().reporters().await?;
    unpaged("reporters", &all, json::reporter, &fields)
}

// ---- locks ----

/// `GET /locks`: every lock with its count, the builds holding it, the builders taking
/// it and how many queued requests wait for it (a handful per database: not paged).
pub async fn locks(
    State(s): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    let fields = parse_entity(raw.as_deref(), json::LOCK_FIELDS)?;
    let all = s.engine.client().locks().await?;
    unpaged("locks", &all, json::lock, &fields)
}

// ---- masters ----

pub async fn masters(
    State(s): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    let q = parse_collection::<MasterField>(raw.as_deref(), json::MASTER_FIELDS, s.paging())?;
    let page = s.engine.client().query_masters(&q.query).await?;
    page_reply::<MasterField, _>(&page, json::master, &q.fields)
}

pub async fn master(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(mid): Path<String>,
    RawQuery(raw): RawQuery,
) -> Reply {
    authorize_read(&s, &headers)?;
    let fields = parse_entity(raw.as_deref(), json::MASTER_FIELDS)?;
    let m = s
        .engine
        .client()
        .master(MasterId(id("master", &mid)?))
        .await?;
    Ok(Json(json::entity("masters", json::master(&m), &fields)))
}
