//! Rows built as JSON inside SQLite, so that a batch comes back in one value.

/// A request joined with its claim, as one JSON object (`r` and `c` as in `REQUEST_FROM`).
pub(super) const REQUEST_JSON: &str = "json_object('id', r.id, 'buildset_id', r.buildset_id, \
     'builder_id', r.builder_id, 'priority', r.priority, 'submitted_at', r.submitted_at, 'waited_for', r.waited_for, \
     'complete', r.complete, 'complete_at', r.complete_at, 'results', r.results, 'cancel_requested', r.cancel_requested, 'not_before', r.not_before, 'superseded_by', r.superseded_by, \
     'claimed_by', c.master_id, 'claimed_at', c.claimed_at)";

/// A build as one JSON object, with `b` as the table alias.
pub(super) const BUILD_JSON: &str = "json_object('id', b.id, 'number', b.number, 'builder_id', b.builder_id, \
     'buildrequest_id', b.buildrequest_id, 'master_id', b.master_id, 'worker_slot', b.worker_slot, \
     'started_at', b.started_at, 'complete_at', b.complete_at, 'state_string', b.state_string, \
     'locks_duration_s', b.locks_duration_s, 'results', b.results, 'return_value', b.return_value, \
     'error', b.error, 'traceback', b.traceback)";

/// A buildset's reason, properties, stamps and depth as one JSON array, with `bs` as the
/// alias of `buildsets`.
pub(super) const CONTEXT_JSON: &str = "json_array(bs.reason, \
     json((SELECT json_group_array(json_array(p.name, p.value, p.source)) \
           FROM buildset_properties p WHERE p.buildset_id = bs.id)), \
     json((SELECT json_group_array(json_array(s.codebase, s.repository, s.branch, s.revision, s.project)) \
           FROM buildset_sourcestamps bss JOIN sourcestamps s ON s.id = bss.sourcestamp_id \
           WHERE bss.buildset_id = bs.id)), bs.depth)";
