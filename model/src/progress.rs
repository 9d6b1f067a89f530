//! Nested progress: reports per group path, read back as a tree.

use serde::{Deserialize, Serialize};

use super::Timestamp;

/// One progress report from a running build: where it is in one group of its work.
///
/// The group path names nested groups from the outside in (`["compile", "crate-a"]`); the
/// empty path is the build as a whole. The latest report per group wins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressReport {
    /// The group, from the outermost name inwards.
    pub group: Vec<String>,
    /// Units of work done in this group.
    pub current: u64,
    /// Units of work this group has in all.
    pub total: u64,
    /// A short human status line.
    pub status: String,
}

/// A stored progress report with the time it arrived.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressRecord {
    /// The report itself.
    #[serde(flatten)]
    pub report: ProgressReport,
    /// When the engine stored it.
    pub updated_at: Timestamp,
}

/// One group in a progress tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressNode {
    /// The group's own name (empty for the root).
    pub name: String,
    /// Its full path.
    pub group: Vec<String>,
    /// Work done: its own report's, or else the sum over its children.
    pub current: u64,
    /// Work in all: its own report's, or else the sum over its children.
    pub total: u64,
    /// Its own report's status line, if it has a report.
    pub status: Option<String>,
    /// Whether the numbers come from a report for this very group.
    pub reported: bool,
    /// Nested groups, in the order they first reported.
    pub children: Vec<ProgressNode>,
}

impl ProgressNode {
    fn empty(group: Vec<String>) -> Self {
        ProgressNode {
            name: group.last().cloned().unwrap_or_default(),
            group,
            current: 0,
            total: 0,
            status: None,
            reported: false,
            children: Vec::new(),
        }
    }

    /// The fraction done in 0..=1, or `None` when the total is zero.
    pub fn fraction(&self) -> Option<f64> {
        (self.total > 0).then(|| (self.current.min(self.total)) as f64 / self.total as f64)
    }

    /// Builds the tree for a build's reports. Groups that never reported themselves but
    /// have reporting descendants appear as summing nodes; the root always exists.
    pub fn tree(records: &[ProgressRecord]) -> ProgressNode {
        let mut root = ProgressNode::empty(Vec::new());
        for record in records {
            let mut node = &mut root;
            for depth in 0..record.report.group.len() {
                let name = &record.report.group[depth];
                let index = match node.children.iter().position(|c| &c.name == name) {
                    Some(i) => i,
                    None => {
                        node.children
                            .push(ProgressNode::empty(record.report.group[..=depth].to_vec()));
                        node.children.len() - 1
                    }
                };
                node = &mut node.children[index];
            }
            node.current = record.report.current;
            node.total = record.report.total;
            node.status = Some(record.report.status.clone());
            node.reported = true;
        }
        root.sum_unreported();
        root
    }

    fn sum_unreported(&mut self) {
        for child in &mut self.children {
            child.sum_unreported();
        }
        if !self.reported {
            self.current = self.children.iter().map(|c| c.current).sum();
            self.total = self.children.iter().map(|c| c.total).sum();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(group: &[&str], current: u64, total: u64) -> ProgressRecord {
        ProgressRecord {
            report: ProgressReport {
                group: group.iter().map(|s| s.to_string()).collect(),
                current,
                total,
                status: format!("{current}/{total}"),
            },
            updated_at: Timestamp::UNIX_EPOCH,
        }
    }

    #[test]
    fn a_group_without_its_own_report_sums_its_children() {
        let tree = ProgressNode::tree(&[
            record(&["build", "a"], 1, 4),
            record(&["build", "b"], 3, 6),
            record(&["test"], 2, 10),
        ]);
        assert_eq!((tree.current, tree.total), (6, 20));
        let build = &tree.children[0];
        assert_eq!(
            (
                build.name.as_str(),
                build.current,
                build.total,
                build.reported
            ),
            ("build", 4, 10, false)
        );
        assert_eq!(
            build.children[1].group,
            vec!["build".to_string(), "b".to_string()]
        );
    }

    #[test]
    fn a_group_with_its_own_report_keeps_it_over_its_childrens_sum() {
        let tree = ProgressNode::tree(&[record(&["build"], 1, 2), record(&["build", "a"], 5, 5)]);
        assert_eq!((tree.children[0].current, tree.children[0].total), (1, 2));
        assert_eq!(tree.fraction(), Some(0.5));
    }

    #[test]
    fn an_empty_build_has_an_empty_root() {
        let tree = ProgressNode::tree(&[]);
        assert_eq!((tree.current, tree.total, tree.fraction()), (0, 0, None));
    }
}
