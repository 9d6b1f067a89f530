//! Buildbot's query syntax: `field=value`, `field__op=value` (repeated values mean "any
//! of"), repeated `order=` with `-` for descending, `limit`, `offset`, and `field=` to
//! select the fields of each result. Buildbot's field names (`bsid`, `buildrequestid`,
//! ...) live here, at the edge: each maps onto a typed field of the engine's queries,
//! and everything is checked against the field's type before the engine runs the query.

use kiln_engine::storage::{
    BuildField, BuilderField, BuildsetField, Field, Filter, FilterValue, MasterField, Op, Query,
    RequestField,
};

use crate::error::ApiError;

/// A collection of the HTTP API: its name, and its fields under Buildbot's names.
pub trait Collection: Field {
    /// The collection's name in the API (`buildsets`, `buildrequests`, ...).
    const PLURAL: &'static str;

    /// The field's name on the wire.
    fn wire(self) -> &'static str;

    /// The field with this wire name, if the collection has it.
    fn by_wire(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|f| f.wire() == name)
    }

    /// Every field's wire name, comma-separated, for messages.
    fn wire_list() -> String {
        Self::ALL
            .iter()
            .map(|f| f.wire())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Collection for BuildsetField {
    const PLURAL: &'static str = "buildsets";

    fn wire(self) -> &'static str {
        match self {
            BuildsetField::Id => "bsid",
            other => other.name(),
        }
    }
}

impl Collection for RequestField {
    const PLURAL: &'static str = "buildrequests";

    fn wire(self) -> &'static str {
        match self {
            RequestField::Id => "buildrequestid",
            RequestField::BuildsetId => "buildsetid",
            RequestField::BuilderId => "builderid",
            RequestField::ClaimedBy => "claimed_by_masterid",
            other => other.name(),
        }
    }
}

impl Collection for BuildField {
    const PLURAL: &'static str = "builds";

    fn wire(self) -> &'static str {
        match self {
            BuildField::Id => "buildid",
            BuildField::BuilderId => "builderid",
            BuildField::RequestId => "buildrequestid",
            BuildField::BuildsetId => "buildsetid",
            BuildField::MasterId => "masterid",
            BuildField::WorkerSlot => "workerslot",
            other => other.name(),
        }
    }
}

impl Collection for BuilderField {
    const PLURAL: &'static str = "builders";

    fn wire(self) -> &'static str {
        match self {
            BuilderField::Id => "builderid",
            other => other.name(),
        }
    }
}

impl Collection for MasterField {
    const PLURAL: &'static str = "masters";

    fn wire(self) -> &'static str {
        match self {
            MasterField::Id => "masterid",
            other => other.name(),
        }
    }
}

/// A parsed collection request.
#[derive(Clone, Debug, PartialEq)]
pub struct CollectionQuery<F> {
    /// What the engine runs (always counted: a collection reply carries the total).
    pub query: Query<F>,
    /// The fields each result keeps (`field=`); all when empty.
    pub fields: Vec<String>,
}

/// Decodes one `application/x-www-form-urlencoded` component.
fn decode(text: &str) -> Result<String, ApiError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!("bad percent-encoding in {text:?}"))
                    })?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out)
        .map_err(|_| ApiError::BadRequest(format!("{text:?} is not UTF-8 once decoded")))
}

/// The `key=value` pairs of a query string, decoded, in order.
pub fn pairs(raw: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    let Some(raw) = raw.filter(|r| !r.is_empty()) else {
        return Ok(Vec::new());
    };
    raw.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

fn number(key: &str, value: &str) -> Result<u32, ApiError> {
    value
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("{key}={value:?}: expected a whole number ≥ 0")))
}

/// How a collection is paged: the page size without `limit`, and the largest `limit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Paging {
    /// Items per page when the request names no `limit`.
    pub default: u32,
    /// The largest `limit` a request may name.
    pub max: u32,
}

impl Default for Paging {
    fn default() -> Self {
        Paging {
            default: crate::DEFAULT_PAGE,
            max: crate::MAX_PAGE,
        }
    }
}

/// Reads a collection request. `outputs` are the field names results have (what
/// `field=` may select), beyond the filterable ones.
pub fn parse_collection<F: Collection>(
    raw: Option<&str>,
    outputs: &[&str],
    paging: Paging,
) -> Result<CollectionQuery<F>, ApiError> {
    let plural = F::PLURAL;
    let mut parsed = CollectionQuery {
        query: Query::new().counted(),
        fields: Vec::new(),
    };
    let mut limit = None;
    for (key, value) in pairs(raw)? {
        match key.as_str() {
            "order" => {
                let (name, descending) = match value.strip_prefix('-') {
                    Some(name) => (name, true),
                    None => (value.as_str(), false),
                };
                let Some(field) = F::by_wire(name) else {
                    return Err(ApiError::BadRequest(format!(
                        "cannot order {plural} by {name:?}: not one of its fields ({})",
                        F::wire_list()
                    )));
                };
                parsed.query.order.push((field, descending));
            }
            "limit" => {
                let n = number("limit", &value)?;
                if n == 0 {
                    return Err(ApiError::BadRequest("limit must be at least 1".into()));
                }
                if n > paging.max {
                    return Err(ApiError::BadRequest(format!(
                        "limit={n}: at most {} {plural} per page; read on with offset",
                        paging.max
                    )));
                }
                limit = Some(n);
            }
            "offset" => parsed.query.offset = Some(number("offset", &value)?),
            "field" => {
                if F::by_wire(&value).is_none() && !outputs.contains(&value.as_str()) {
                    return Err(ApiError::BadRequest(format!(
                        "{plural} have no field {value:?}"
                    )));
                }
                parsed.fields.push(value);
            }
            _ => add_filter(&mut parsed.query, &key, &value)?,
        }
    }
    parsed.query.limit = Some(limit.unwrap_or(paging.default));
    Ok(parsed)
}

fn add_filter<F: Collection>(query: &mut Query<F>, key: &str, value: &str) -> Result<(), ApiError> {
    let plural = F::PLURAL;
    let (field, op) = match key.split_once("__") {
        Some((field, op)) => (
            field,
            op.parse::<Op>()
                .map_err(|e| ApiError::BadRequest(format!("{key}: {e}")))?,
        ),
        None => (key, Op::Eq),
    };
    let Some(typed) = F::by_wire(field) else {
        return Err(ApiError::BadRequest(format!(
            "unknown parameter {key:?}: {plural} have no field {field:?} (fields: {}; \
             also order, limit, offset, field)",
            F::wire_list()
        )));
    };
    let ty = typed.kind();
    if !ty.allows(op) {
        return Err(ApiError::BadRequest(format!(
            "{key}: the {op} operator does not apply to {field} ({ty:?})"
        )));
    }
    // `in`/`notin` also take a comma-separated list in one value.
    let parts: Vec<&str> = if matches!(op, Op::In | Op::NotIn) {
        value.split(',').collect()
    } else {
        vec![value]
    };
    let mut values = Vec::new();
    for part in parts {
        let v = FilterValue::parse(ty, part)
            .map_err(|e| ApiError::BadRequest(format!("{key}={value:?}: {e}")))?;
        if v == FilterValue::Null && !matches!(op, Op::Eq | Op::Ne | Op::In | Op::NotIn) {
            return Err(ApiError::BadRequest(format!(
                "{key}: null can only be compared with eq, ne, in or notin"
            )));
        }
        values.push(v);
    }
    match query
        .filters
        .iter_mut()
        .find(|f| f.field == typed && f.op == op)
    {
        Some(existing) => existing.values.extend(values),
        None => query.filters.push(Filter {
            field: typed,
            op,
            values,
        }),
    }
    Ok(())
}

/// Checks a single-entity request: only `field=` is allowed, filters are a 400.
pub fn parse_entity(raw: Option<&str>, outputs: &[&str]) -> Result<Vec<String>, ApiError> {
    let mut fields = Vec::new();
    for (key, value) in pairs(raw)? {
        if key == "field" {
            if !outputs.contains(&value.as_str()) {
                return Err(ApiError::BadRequest(format!("no field {value:?} here")));
            }
            fields.push(value);
        } else {
            return Err(ApiError::BadRequest(format!(
                "{key:?}: filters, ordering and paging apply to collections, not to a single entity"
            )));
        }
    }
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_values_of_one_filter_mean_any_of() {
        let q = parse_collection::<BuildField>(
            Some("results=0&results=FAILURE&number__gt=3&order=-number&limit=5&field=buildid"),
            &[],
            Paging::default(),
        )
        .unwrap();
        assert_eq!(q.query.filters.len(), 2);
        assert_eq!(q.query.filters[0].values.len(), 2);
        assert_eq!(q.query.order, [(BuildField::Number, true)]);
        assert!(q.query.count, "a collection reply carries the total");
        assert_eq!(q.query.limit, Some(5));
        assert_eq!(q.fields, ["buildid"]);
    }

    #[test]
    fn bad_parameters_say_what_is_wrong() {
        let err = |raw: &str| {
            parse_collection::<BuildField>(Some(raw), &[], Paging::default())
                .unwrap_err()
                .to_string()
        };
        assert!(err("colour=red").contains("no field \"colour\""));
        assert!(err("number__like=3").contains("unknown operator \"like\""));
        assert!(err("number=three").contains("not a whole number"));
        assert!(err("state_string__gt=a").contains("does not apply"));
        assert!(err("order=colour").contains("cannot order"));
        assert!(err("limit=-1").contains("whole number"));
        assert!(err("reason=%zz").contains("percent-encoding"));
        assert!(err("limit=4294967295").contains("at most 1000"));
        assert!(err("state_string=a%00b").contains("NUL"));
    }

    #[test]
    fn every_field_has_one_wire_name_in_its_collection() {
        fn distinct<F: Collection>() {
            let names: std::collections::BTreeSet<_> = F::ALL.iter().map(|f| f.wire()).collect();
            assert_eq!(names.len(), F::ALL.len(), "{}", F::PLURAL);
            for f in F::ALL {
                assert_eq!(F::by_wire(f.wire()), Some(*f));
            }
        }
        distinct::<BuildsetField>();
        distinct::<RequestField>();
        distinct::<BuildField>();
        distinct::<BuilderField>();
        distinct::<MasterField>();
    }
}
