//! Result directories: one per build, whose files become the build's artifacts.

use std::path::{Path, PathBuf};

use tracing::warn;

use kiln_model::Artifact;

/// The most files recorded per build; a build that leaves more keeps them on disk, but
/// only the first ones (in directory order) are listed.
pub(super) const MAX_ARTIFACTS: usize = 10_000;
/// How deep under its result directory a build's files are looked for: deeper ones stay
/// on disk unlisted (a guest can nest directories without end; the walk must not).
pub(super) const MAX_ARTIFACT_DEPTH: usize = 32;

/// Creates `<root>/<builder>/<number>/` and returns it, or `None` (with a warning) if
/// it cannot be created.
pub(super) async fn prepare(root: &Path, builder: &str, number: i64) -> Option<PathBuf> {
    let dir = root.join(safe_component(builder)).join(number.to_string());
    // A directory left by an earlier database with the same numbers must not lend its
    // files to this build.
    let _ = tokio::fs::remove_dir_all(&dir).await;
    match tokio::fs::create_dir_all(&dir).await {
        Ok(()) => Some(dir),
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "cannot create the build's result directory");
            None
        }
    }
}

/// Removes the result directories of deleted builds (`(builder name, number)`), and
/// their builder's directory when it is left empty. A directory already gone is fine.
pub(crate) async fn remove(root: &Path, builds: Vec<(String, i64)>) {
    let root = root.to_path_buf();
    let removed = tokio::task::spawn_blocking(move || {
        let mut parents = std::collections::BTreeSet::new();
        for (builder, number) in builds {
            let parent = root.join(safe_component(&builder));
            let dir = parent.join(number.to_string());
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => warn!(dir = %dir.display(), error = %e, "cannot remove a deleted build's result directory"),
            }
            parents.insert(parent);
        }
        for parent in parents {
            // Fails while other builds' directories are there, which is what keeps it.
            let _ = std::fs::remove_dir(&parent);
        }
    })
    .await;
    if let Err(e) = removed {
        warn!(error = %e, "removing result directories failed");
    }
}

/// Lists the files under `dir` and removes what is neither a file nor a directory
/// (symbolic links, pipes, sockets, devices): a guest could leave a link to a host path
/// there, which a download would then follow. Removes the directory if the build left
/// nothing in it.
pub(super) async fn collect(dir: PathBuf) -> Vec<Artifact> {
    let listed = tokio::task::spawn_blocking(move || {
        let found = walk(&dir);
        if found.is_empty() {
            let _ = std::fs::remove_dir(&dir);
        }
        found
    })
    .await;
    listed.unwrap_or_default()
}

/// Walks the tree without recursion and without following links, at most
/// [`MAX_ARTIFACT_DEPTH`] deep and [`MAX_ARTIFACTS`] files long.
fn walk(root: &Path) -> Vec<Artifact> {
    let mut found = Vec::new();
    let mut dirs = vec![(root.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                if depth + 1 < MAX_ARTIFACT_DEPTH {
                    dirs.push((path, depth + 1));
                }
            } else if !meta.is_file() {
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        warn!(path = %path.display(), "removed what a build left in its result directory that is not a file (a link, pipe, socket or device)")
                    }
                    Err(e) => {
                        warn!(path = %path.display(), error = %e, "cannot remove a link or special file from a result directory")
                    }
                }
            } else if found.len() < MAX_ARTIFACTS {
                let Some(relative) = relative_utf8(root, &path) else {
                    warn!(path = %path.display(), "a build left a file whose name is not UTF-8; it is not listed");
                    continue;
                };
                let Some(location) = path.to_str() else {
                    continue;
                };
                found.push(Artifact {
                    path: relative,
                    size: meta.len(),
                    location: location.to_owned(),
                });
            }
        }
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found
}

/// `path` relative to `root`, '/'-separated, if every component is UTF-8.
fn relative_utf8(root: &Path, path: &Path) -> Option<String> {
    let relative = path.strip_prefix(root).ok()?;
    let parts: Option<Vec<&str>> = relative
        .components()
        .map(|c| c.as_os_str().to_str())
        .collect();
    Some(parts?.join("/"))
}

/// A builder name as one safe path component.
fn safe_component(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if cleaned.is_empty() || cleaned.chars().all(|c| c == '.') {
        format!("_{cleaned}")
    } else {
        cleaned
    }
}

#[cfg(test)]
mod tests {
    use super::safe_component;

    #[test]
    fn builder_names_become_safe_path_components() {
        assert_eq!(safe_component("compile"), "compile");
        assert_eq!(safe_component("a/b c"), "a_b_c");
        assert_eq!(safe_component(".."), "_..");
        assert_eq!(safe_component(""), "_");
    }
}
