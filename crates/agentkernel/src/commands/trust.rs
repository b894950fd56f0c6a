//! `agentkernel trust [DIR]`: consent for a project's `agentkernel.toml` to
//! loosen the sandbox (core `trust.rs` decides what loosens).

use std::path::{Path, PathBuf};

use agentkernel_core::config::Config;
use agentkernel_core::trust::{self, Flags, TrustStore};
use agentkernel_core::{paths, Error, Result};

use crate::cli::TrustArgs;

pub fn trust(args: TrustArgs) -> Result<i32> {
    let store = TrustStore::open_default();
    if args.list {
        for (file, sha256) in store.entries()? {
            let state = match std::fs::read(&file) {
                Ok(bytes) if trust::sha256_hex(&bytes) == sha256 => "trusted",
                Ok(_) => "changed since (not trusted)",
                Err(_) => "missing",
            };
            println!("{file}\t{state}");
        }
        return Ok(0);
    }
    let (dir, file) = project_file(args.dir.as_deref())?;
    if args.revoke {
        let was = store.revoke(&file)?;
        eprintln!(
            "agentkernel: {} {}",
            if was {
                "no longer trusted:"
            } else {
                "was not trusted:"
            },
            file.display()
        );
        return Ok(0);
    }
    // Parse it as a run would (a file with errors is not worth trusting) and
    // say what the trust allows.
    let config = Config::load(&dir, None)?;
    let project = config.project.as_ref().ok_or_else(|| {
        Error::invalid(
            "trust",
            file.display().to_string(),
            "no such file; give the project directory or its agentkernel.toml",
        )
    })?;
    store.trust(&project.path, &project.sha256)?;
    let loosened = trust::loosening(project, &dir, &Flags::default());
    let what = if loosened.is_empty() {
        "it loosens nothing today".to_string()
    } else {
        format!("it may now loosen: {}", loosened.join(", "))
    };
    eprintln!(
        "agentkernel: trusted {} (sha256 {}); {what}",
        project.path.display(),
        &project.sha256[..12]
    );
    Ok(0)
}

/// DIR (or the current directory) and its `agentkernel.toml`, both absolute;
/// a path to the file itself is accepted too.
fn project_file(arg: Option<&Path>) -> Result<(PathBuf, PathBuf)> {
    let given = arg.unwrap_or(Path::new("."));
    let real = given
        .canonicalize()
        .map_err(|e| Error::invalid("trust", given.display().to_string(), e.to_string()))?;
    if real.is_dir() {
        let file = paths::project_config_file(&real);
        return Ok((real, file));
    }
    if real.file_name().and_then(|n| n.to_str()) != Some(paths::PROJECT_CONFIG_NAME) {
        return Err(Error::invalid(
            "trust",
            given.display().to_string(),
            "only a project's agentkernel.toml is checked for trust; give its directory",
        ));
    }
    let dir = real.parent().unwrap_or(Path::new("/")).to_path_buf();
    Ok((dir, real))
}
