//! `[build]`: the engine builds the sandbox's image from a Dockerfile (the
//! Engine API's `/build`, the same call `docker build` makes), tagged as
//! `BuildSpec::tag` says. The context is sent as a tar that never follows a
//! symlink: a link in the project to a host file is sent as the link, not as
//! the file it names. What the context's `.dockerignore` excludes is not sent.

use std::collections::HashMap;
use std::path::Path;

use agentkernel_core::image_build::BuildSpec;
use agentkernel_core::Error;
use futures_util::StreamExt;

use crate::Engine;

/// The name a Dockerfile outside its context travels under in the tar.
const OUTSIDE_DOCKERFILE: &str = ".agentkernel-build.Dockerfile";

/// Builds `build` as `tag`; one line naming the config file and the
/// engine's error when the build fails.
pub async fn build(engine: &Engine, build: &BuildSpec, tag: &str) -> Result<(), Error> {
    let at = build.config.display();
    let refuse = |what: &str, path: &std::path::Path, why: String| {
        Error::Conflict(format!(
            "{at}: [build] {what} {}: {why}; fix the path in [build]",
            path.display()
        ))
    };
    if !build.dockerfile.is_file() {
        return Err(refuse(
            "dockerfile",
            &build.dockerfile,
            "no such file".into(),
        ));
    }
    let context = build
        .context
        .canonicalize()
        .ok()
        .filter(|c| c.is_dir())
        .ok_or_else(|| refuse("context", &build.context, "no such directory".into()))?;
    let dockerfile = build
        .dockerfile
        .canonicalize()
        .map_err(|e| refuse("dockerfile", &build.dockerfile, e.to_string()))?;
    let archive = context_tar(&context, &dockerfile)
        .map_err(|e| refuse("context", &build.context, e.to_string()))?;
    let dockerfile_in_tar = match dockerfile.strip_prefix(&context) {
        Ok(inside) => inside.to_string_lossy().into_owned(),
        Err(_) => OUTSIDE_DOCKERFILE.to_string(),
    };
    eprintln!(
        "agentkernel: building {tag} from {} ({})",
        dockerfile.display(),
        engine.flavor.name()
    );
    let options = bollard::query_parameters::BuildImageOptions {
        dockerfile: dockerfile_in_tar,
        t: Some(tag.to_string()),
        target: build.target.clone().unwrap_or_default(),
        nocache: build.no_cache,
        buildargs: (!build.args.is_empty()).then(|| {
            build
                .args
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<HashMap<_, _>>()
        }),
        labels: Some(HashMap::from([(
            crate::labels::MANAGED.to_string(),
            "true".to_string(),
        )])),
        rm: true,
        forcerm: true,
        ..Default::default()
    };
    let mut stream = engine.docker.build_image(
        options,
        None,
        Some(bollard::body_try_stream(
            file_body(archive).map(|chunk| chunk.map(Into::into)),
        )),
    );
    // The engine's log is kept, not shown: on failure its last lines say why.
    let mut log: Vec<String> = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let Some(detail) = info.error_detail.and_then(|d| d.message) {
                    return Err(failed(engine, &at, &detail, &log));
                }
                if let Some(line) = info.stream.or(info.status) {
                    log.extend(line.lines().map(str::to_string));
                }
            }
            Err(e) => {
                let message = crate::engine::message_of(&e);
                return Err(failed(engine, &at, &message, &log));
            }
        }
    }
    Ok(())
}

fn failed(engine: &Engine, at: &dyn std::fmt::Display, why: &str, log: &[String]) -> Error {
    let step = log
        .iter()
        .rev()
        .find(|l| l.trim_start().starts_with("Step ") || l.trim_start().starts_with("STEP "))
        .map(|s| format!(" at {}", s.trim()))
        .unwrap_or_default();
    Error::Conflict(format!(
        "{at}: [build] failed on {}{step}: {}; fix the Dockerfile or [build]",
        engine.flavor.name(),
        why.trim().replace('\n', " ")
    ))
}

/// The context directory as a tar, symlinks as symlinks, without what its
/// `.dockerignore` leaves out (the Dockerfile itself always goes, as with
/// the Docker CLI); a Dockerfile outside the context is added as
/// [`OUTSIDE_DOCKERFILE`].
/// The tar goes to an unnamed temporary file (never the whole context in
/// memory), rewound for streaming.
fn context_tar(context: &Path, dockerfile: &Path) -> std::io::Result<std::fs::File> {
    use std::io::Seek as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let rules = crate::dockerignore::Rules::read(context)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(std::env::temp_dir())?;
    let mut builder = tar::Builder::new(file);
    builder.follow_symlinks(false);
    let keep = dockerfile
        .strip_prefix(context)
        .ok()
        .map(|p| p.to_string_lossy().into_owned());
    add_tree(&mut builder, context, "", &rules, keep.as_deref())?;
    if keep.is_none() {
        builder.append_path_with_name(dockerfile, OUTSIDE_DOCKERFILE)?;
    }
    let mut file = builder.into_inner()?;
    file.rewind()?;
    Ok(file)
}

/// `file`, read in chunks as the request body.
fn file_body(file: std::fs::File) -> impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> {
    futures_util::stream::unfold(Some(file), |file| async move {
        use std::io::Read as _;
        let mut file = file?;
        let mut chunk = vec![0u8; 1 << 20];
        match file.read(&mut chunk) {
            Ok(0) => None,
            Ok(n) => {
                chunk.truncate(n);
                Some((Ok(chunk), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}

/// Adds the entries of `dir` (at `prefix` in the context), recursively.
fn add_tree(
    builder: &mut tar::Builder<std::fs::File>,
    dir: &Path,
    prefix: &str,
    rules: &crate::dockerignore::Rules,
    keep: Option<&str>,
) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let relative = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let path = entry.path();
        let is_dir = entry.file_type()?.is_dir();
        let excluded = rules.excludes(&relative)
            && !keep.is_some_and(|k| k == relative || k.starts_with(&format!("{relative}/")));
        if is_dir {
            if !excluded {
                builder.append_dir(&relative, &path)?;
            }
            // An excluded directory may still hold a `!` exception.
            if !excluded || rules.has_exceptions() {
                add_tree(builder, &path, &relative, rules, keep)?;
            }
        } else if !excluded {
            builder.append_path_with_name(&path, &relative)?;
        }
    }
    Ok(())
}
