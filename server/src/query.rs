//! Buildbot's query syntax: `field=value`, `field__op=value` (repeated values mean "any
//! of"), repeated `order=` with `-` for descending, `limit`, `offset`, and `field=` to
//! select the fields of each result. Everything is checked against the collection's
//! typed fields before the store runs the query in SQL.

use kiln_engine::storage::{Collection, Filter, FilterValue, Op, Query};

use crate::error::ApiError;

/// A parsed collection request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CollectionQuery {
    /// What the store runs.
    pub query: Query,
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
pub fn parse_collection(
    collection: Collection,
    raw: Option<&str>,
    outputs: &[&str],
    paging: Paging,
) -> Result<CollectionQuery, ApiError> {
    let plural = collection.plural();
    let mut parsed = CollectionQuery::default();
    let mut limit = None;
    for (key, value) in pairs(raw)? {
        match key.as_str() {
            "order" => {
                let (name, descending) = match value.strip_prefix('-') {
                    Some(name) => (name, true),
                    None => (value.as_str(), false),
                };
                if collection.field(name).is_none() {
                    return Err(ApiError::BadRequest(format!(
                        "cannot order {plural} by {name:?}: not one of its fields ({})",
                        field_list(collection)
                    )));
                }
                parsed.query.order.push((name.to_owned(), descending));
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
                if collection.field(&value).is_none() && !outputs.contains(&value.as_str()) {
                    return Err(ApiError::BadRequest(format!(
                        "{plural} have no field {value:?}"
                    )));
                }
                parsed.fields.push(value);
            }
            _ => add_filter(collection, &mut parsed.query, &key, &value)?,
        }
    }
    parsed.query.limit = Some(limit.unwrap_or(paging.default));
    Ok(parsed)
}

fn field_list(collection: Collection) -> String {
    collection
        .fields()
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

fn add_filter(
    collection: Collection,
    query: &mut Query,
    key: &str,
    value: &str,
) -> Result<(), ApiError> {
    let plural = collection.plural();
    let (field, op) = match key.split_once("__") {
        Some((field, op)) => (
            field,
            op.parse::<Op>()
                .map_err(|e| ApiError::BadRequest(format!("{key}: {e}")))?,
        ),
        None => (key, Op::Eq),
    };
    let Some(ty) = collection.field(field) else {
        return Err(ApiError::BadRequest(format!(
            "unknown parameter {key:?}: {plural} have no field {field:?} (fields: {}; \
             also order, limit, offset, field)",
            field_list(collection)
        )));
    };
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
        .find(|f| f.field == field && f.op == op)
    {
        Some(existing) => existing.values.extend(values),
        None => query.filters.push(Filter {
            field: field.to_owned(),
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
        let q = parse_collection(
            Collection::Builds,
            Some("results=0&results=FAILURE&number__gt=3&order=-number&limit=5&field=buildid"),
            &[],
            Paging::default(),
        )
        .unwrap();
        assert_eq!(q.query.filters.len(), 2);
        assert_eq!(q.query.filters[0].values.len(), 2);
        assert_eq!(q.query.order, [("number".to_owned(), true)]);
        assert_eq!(q.query.limit, Some(5));
        assert_eq!(q.fields, ["buildid"]);
    }

    #[test]
    fn bad_parameters_say_what_is_wrong() {
        let err = |raw: &str| {
            parse_collection(Collection::Builds, Some(raw), &[], Paging::default())
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
}
