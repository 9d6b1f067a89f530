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

/// Where builds run their result directories before they are kept: one staging
/// directory per builder, master and worker slot, `<root>/<builder>/.building-<master>-<slot>/`,
/// reused from one build to the next while builds leave it empty.
///
/// Making and removing a directory per build cost a quarter of `kiln serve`'s CPU under
/// load (two cores spinning on the builder directory's inode lock in `mkdir` and
/// `rmdir`); most builds write nothing there. A build that leaves files has its staging
/// directory renamed to `<root>/<builder>/<number>/` (one `rename`), and the slot gets a
/// fresh one at its next build.
#[derive(Default)]
pub(crate) struct Staging {
    /// Staging directories this process emptied or found empty after a build: the next
    /// build in their slot takes them as they are.
    clean: std::sync::Mutex<std::collections::HashSet<PathBuf>>,
}

impl Staging {
    fn take_clean(&self, dir: &Path) -> bool {
        self.clean
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(dir)
    }

    fn put_clean(&self, dir: PathBuf) {
        self.clean
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(dir);
    }

    /// Removes the empty staging directories (the engine is stopping).
    pub(crate) fn clear(&self) {
        let dirs: Vec<PathBuf> = self
            .clean
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain()
            .collect();
        for dir in dirs {
            // Only empty ones are here; remove_dir refuses anything else.
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

/// A build's result directory while it runs, and where its files go when it ends.
pub(super) struct ResultDir {
    /// The staging directory the build writes to.
    pub(super) staging: PathBuf,
    /// `<root>/<builder>/<number>/`, where what it leaves is kept.
    kept: PathBuf,
}

/// Gives a build its (empty) result directory: its slot's staging directory, made afresh
/// unless this process left it empty after the slot's previous build. `None` (with a
/// warning) if it cannot be made.
pub(super) async fn prepare(
    staging: &Staging,
    root: &Path,
    builder: &str,
    master: i64,
    slot: i64,
    number: i64,
) -> Option<ResultDir> {
    let parent = root.join(safe_component(builder));
    let dir = ResultDir {
        staging: parent.join(format!(".building-{master}-{slot}")),
        kept: parent.join(number.to_string()),
    };
    if staging.take_clean(&dir.staging) {
        return Some(dir);
    }
    let path = dir.staging.clone();
    // Whatever an earlier process (or a build that left files) had there goes first.
    let made = tokio::task::spawn_blocking(move || {
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(&path)
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    match made {
        Ok(()) => Some(dir),
        Err(e) => {
            warn!(dir = %dir.staging.display(), error = %e, "cannot create the build's result directory");
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

/// Lists the files a build left in its result directory, after removing what is neither
/// a file nor a directory (symbolic links, pipes, sockets, devices: a guest could leave a
/// link to a host path there, which a download would then follow), and keeps them: the
/// staging directory becomes `<root>/<builder>/<number>/` (replacing a directory an
/// earlier database left under that number, which must not lend its files to this
/// build). A directory left empty goes back to the slot for its next build.
pub(super) async fn collect(staging: &Staging, dir: ResultDir) -> Vec<Artifact> {
    let ResultDir {
        staging: path,
        kept,
    } = dir;
    // Most builds leave nothing: one look at the directory, no walk, and made here rather
    // than on the blocking pool. Reading one local directory costs a few microseconds;
    // the hand-off to a blocking thread and back cost more than that, once per build
    // (under 16 REST clients this step took about a tenth of the server's CPU, most of it
    // the hand-off).
    if std::fs::read_dir(&path).is_ok_and(|mut d| d.next().is_none()) {
        staging.put_clean(path);
        return Vec::new();
    }
    let listed = tokio::task::spawn_blocking(move || {
        let found = walk(&path);
        if found.is_empty() {
            // Only empty directories: nothing to keep, and the slot starts afresh.
            let _ = std::fs::remove_dir_all(&path);
            return (found, None);
        }
        match std::fs::remove_dir_all(&kept) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(dir = %kept.display(), error = %e, "cannot replace an old result directory; the build's files are not kept");
                let _ = std::fs::remove_dir_all(&path);
                return (Vec::new(), None);
            }
        }
        if let Err(e) = std::fs::rename(&path, &kept) {
            warn!(from = %path.display(), to = %kept.display(), error = %e, "cannot keep the build's result directory; its files are not kept");
            let _ = std::fs::remove_dir_all(&path);
            return (Vec::new(), None);
        }
        let moved = found
            .into_iter()
            .filter_map(|a| {
                let location = kept.join(&a.path).to_str()?.to_owned();
                Some(Artifact { location, ..a })
            })
            .collect();
        (moved, None)
    })
    .await;
    match listed {
        Ok((found, clean)) => {
            if let Some(dir) = clean {
                staging.put_clean(dir);
            }
            found
        }
        Err(e) => {
            warn!(error = %e, "listing a build's result directory failed");
            Vec::new()
        }
    }
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
