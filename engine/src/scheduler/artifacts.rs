//! Result directories: one per build, whose files become the build's artifacts.

use std::path::{Path, PathBuf};

use tracing::warn;

use crate::model::Artifact;

/// The most files recorded per build; a build that leaves more keeps them on disk, but
/// only the first ones (in directory order) are listed.
pub(super) const MAX_ARTIFACTS: usize = 10_000;

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

/// Lists the files under `dir` (never following symbolic links); removes the directory
/// if the build left nothing there.
pub(super) async fn collect(dir: PathBuf) -> Vec<Artifact> {
    let listed = tokio::task::spawn_blocking(move || {
        let mut found = Vec::new();
        walk(&dir, &dir, &mut found);
        if found.is_empty() {
            let _ = std::fs::remove_dir(&dir);
        }
        found
    })
    .await;
    listed.unwrap_or_default()
}

fn walk(root: &Path, dir: &Path, found: &mut Vec<Artifact>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if found.len() >= MAX_ARTIFACTS {
            return;
        }
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            walk(root, &path, found);
        } else if meta.is_file() {
            let relative = path.strip_prefix(root).unwrap_or(&path);
            let relative: Vec<String> = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            found.push(Artifact {
                path: relative.join("/"),
                size: meta.len(),
                location: path.display().to_string(),
            });
        }
    }
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
