//! The listings callers ask for most, as plain structs that turn into typed
//! [`Query`]s: a convenience over the query, never a second way into the tables.

use kiln_model::{BuildId, BuilderId, BuildsetId, MasterId, RequestId};

use crate::query::{BuildField, BuildsetField, Op, Query, RequestField};

/// Which buildsets to list, newest first.
#[derive(Clone, Debug, Default)]
pub struct BuildsetFilter {
    /// Only complete (true) or incomplete (false) ones.
    pub complete: Option<bool>,
    /// Only children of this build.
    pub parent_buildid: Option<BuildId>,
    /// Only ones with this external id.
    pub external_idstring: Option<String>,
    /// At most this many.
    pub limit: Option<u32>,
    /// Skip this many first.
    pub offset: Option<u32>,
}

/// Which claims a request listing wants.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClaimFilter {
    /// Claimed or not.
    #[default]
    Any,
    /// Claimed by some master.
    Claimed,
    /// Not claimed and not complete: ready to run.
    Unclaimed,
    /// Claimed by this master.
    ClaimedBy(MasterId),
}

/// A field a request listing can be ordered by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestOrderField {
    /// The request id.
    Id,
    /// The priority.
    Priority,
    /// The submission time.
    SubmittedAt,
    /// The builder id.
    BuilderId,
    /// The buildset id.
    BuildsetId,
    /// The completion time.
    CompleteAt,
}

/// One ordering key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestOrder {
    /// The field.
    pub field: RequestOrderField,
    /// Whether highest comes first.
    pub descending: bool,
}

/// Which build requests to list.
#[derive(Clone, Debug, Default)]
pub struct RequestFilter {
    /// Only this builder's.
    pub builder_id: Option<BuilderId>,
    /// Only this buildset's.
    pub buildset_id: Option<BuildsetId>,
    /// Only complete (true) or incomplete (false) ones.
    pub complete: Option<bool>,
    /// By claim.
    pub claimed: ClaimFilter,
    /// Only requests whose buildset has a stamp on this branch.
    pub branch: Option<String>,
    /// Only requests whose buildset has a stamp from this repository.
    pub repository: Option<String>,
    /// The ordering, first key first; by id when empty.
    pub order: Vec<RequestOrder>,
    /// At most this many.
    pub limit: Option<u32>,
    /// Skip this many first.
    pub offset: Option<u32>,
}

/// Which builds to list, lowest id first.
#[derive(Clone, Debug, Default)]
pub struct BuildFilter {
    /// Only this builder's.
    pub builder_id: Option<BuilderId>,
    /// Only builds of this request.
    pub request_id: Option<RequestId>,
    /// Only builds of this buildset's requests.
    pub buildset_id: Option<BuildsetId>,
    /// Only finished (true) or running (false) ones.
    pub complete: Option<bool>,
    /// Newest first instead.
    pub descending: bool,
    /// At most this many.
    pub limit: Option<u32>,
    /// Skip this many first.
    pub offset: Option<u32>,
}

impl BuildsetFilter {
    /// The query this filter stands for: newest first.
    pub fn query(&self) -> Query<BuildsetField> {
        let mut q = Query::new().order_by(BuildsetField::Id, true);
        if let Some(complete) = self.complete {
            q = q.eq(BuildsetField::Complete, complete);
        }
        if let Some(parent) = self.parent_buildid {
            q = q.eq(BuildsetField::ParentBuildId, parent);
        }
        if let Some(external) = &self.external_idstring {
            q = q.eq(BuildsetField::ExternalIdstring, external.as_str());
        }
        q.limit = self.limit;
        q.offset = self.offset;
        q
    }
}

impl RequestOrderField {
    /// The field it orders by.
    pub fn field(self) -> RequestField {
        match self {
            RequestOrderField::Id => RequestField::Id,
            RequestOrderField::Priority => RequestField::Priority,
            RequestOrderField::SubmittedAt => RequestField::SubmittedAt,
            RequestOrderField::BuilderId => RequestField::BuilderId,
            RequestOrderField::BuildsetId => RequestField::BuildsetId,
            RequestOrderField::CompleteAt => RequestField::CompleteAt,
        }
    }
}

impl RequestFilter {
    /// The query this filter stands for.
    pub fn query(&self) -> Query<RequestField> {
        let mut q = Query::new();
        if let Some(builder) = self.builder_id {
            q = q.eq(RequestField::BuilderId, builder);
        }
        if let Some(buildset) = self.buildset_id {
            q = q.eq(RequestField::BuildsetId, buildset);
        }
        if let Some(complete) = self.complete {
            q = q.eq(RequestField::Complete, complete);
        }
        q = match self.claimed {
            ClaimFilter::Any => q,
            ClaimFilter::Claimed => q.eq(RequestField::Claimed, true),
            ClaimFilter::Unclaimed => q.eq(RequestField::Claimed, false),
            ClaimFilter::ClaimedBy(master) => q.eq(RequestField::ClaimedBy, master),
        };
        if let Some(branch) = &self.branch {
            q = q.eq(RequestField::Branch, branch.as_str());
        }
        if let Some(repository) = &self.repository {
            q = q.eq(RequestField::Repository, repository.as_str());
        }
        for order in &self.order {
            q = q.order_by(order.field.field(), order.descending);
        }
        q.limit = self.limit;
        q.offset = self.offset;
        q
    }
}

impl BuildFilter {
    /// The query this filter stands for.
    pub fn query(&self) -> Query<BuildField> {
        let mut q = Query::new();
        if let Some(builder) = self.builder_id {
            q = q.eq(BuildField::BuilderId, builder);
        }
        if let Some(request) = self.request_id {
            q = q.eq(BuildField::RequestId, request);
        }
        if let Some(buildset) = self.buildset_id {
            q = q.eq(BuildField::BuildsetId, buildset);
        }
        if let Some(complete) = self.complete {
            q = q.filter(BuildField::Complete, Op::Eq, complete);
        }
        if self.descending {
            q = q.order_by(BuildField::Id, true);
        }
        q.limit = self.limit;
        q.offset = self.offset;
        q
    }
}
