//! The `any-success` relationship policy (see kiln-policy-logic for what it decides).

use kiln_guest::policy::{Child, Decision, Guest, ParentBuild};

struct Policy;

impl Guest for Policy {
    fn decide(_parent: ParentBuild, children: Vec<Child>) -> Decision {
        kiln_guest::policy::bundled("any-success", &children)
    }
}

kiln_guest::export_policy!(Policy);
