//! Reads the project name and current branch straight from `.git`, without
//! spawning `git`: `--branch` is on the start-up path.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The work tree root containing `start`, and its `.git` directory.
fn find_repo(start: &Path) -> Option<(PathBuf, PathBuf)> {
    for dir in start.ancestors() {
        let dotgit = dir.join(".git");
        if dotgit.is_dir() {
            return Some((dir.to_path_buf(), dotgit));
        }
        // A linked worktree or submodule: `.git` is a file `gitdir: <path>`.
        if let Ok(text) = std::fs::read_to_string(&dotgit) {
            if let Some(target) = text.trim().strip_prefix("gitdir:") {
                return Some((dir.to_path_buf(), dir.join(target.trim())));
            }
        }
    }
    None
}

/// (project, branch) for the repository around `dir`. A detached HEAD gives
/// its first 12 hex digits as the "branch".
pub fn project_and_branch(dir: &Path) -> Result<(String, String)> {
    let (root, gitdir) = find_repo(dir).ok_or_else(|| {
        Error::Git(format!(
            "{} is not inside a git work tree; run from a repository or drop --branch",
            dir.display()
        ))
    })?;
    let head_path = gitdir.join("HEAD");
    let head = std::fs::read_to_string(&head_path)
        .map_err(|e| Error::Git(format!("cannot read {}: {e}", head_path.display())))?;
    let head = head.trim();
    let branch = match head.strip_prefix("ref:") {
        Some(r) => r
            .trim()
            .strip_prefix("refs/heads/")
            .unwrap_or(r.trim())
            .to_string(),
        None if head.len() >= 12 => head[..12].to_string(),
        None => return Err(Error::Git(format!("unexpected HEAD `{head}`"))),
    };
    let project = root
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("project")
        .to_string();
    Ok((project, branch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_branch_from_head() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("myapp");
        std::fs::create_dir_all(root.join(".git")).unwrap();
        std::fs::create_dir_all(root.join("src/deep")).unwrap();
        std::fs::write(root.join(".git/HEAD"), "ref: refs/heads/feature/auth\n").unwrap();
        let (p, b) = project_and_branch(&root.join("src/deep")).unwrap();
        assert_eq!((p.as_str(), b.as_str()), ("myapp", "feature/auth"));
    }

    #[test]
    fn detached_head_and_worktree_file() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("gitdir");
        std::fs::create_dir_all(&real).unwrap();
        std::fs::write(real.join("HEAD"), "0123456789abcdef0123\n").unwrap();
        let root = tmp.path().join("wt");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join(".git"), format!("gitdir: {}\n", real.display())).unwrap();
        let (p, b) = project_and_branch(&root).unwrap();
        assert_eq!((p.as_str(), b.as_str()), ("wt", "0123456789ab"));
    }

    #[test]
    fn outside_a_repo_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        // tempdirs live under /tmp, which is not a repository on any sane machine.
        if find_repo(tmp.path()).is_none() {
            assert!(project_and_branch(tmp.path()).is_err());
        }
    }
}
