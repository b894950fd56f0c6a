//! Builders for the command lines tests repeat: `agentkernel run` with a few
//! flags, an image and a command; `exec NAME -- CMD`; `sandbox VERB NAME`.
//!
//! ```ignore
//! env.run_with().name(&name).env("K=V").output(&["sh", "-c", "echo $K"]);
//! env.exec(&name, &["cat", "/tmp/x"]);
//! env.sandbox("stop", &name);
//! ```

use std::process::Output;

use super::{TestEnv, Tracked, BUSYBOX};

/// `agentkernel run FLAGS… [-i IMAGE] CMD…`, BUSYBOX unless told otherwise.
pub struct RunLine<'a> {
    env: &'a TestEnv,
    flags: Vec<String>,
    image: Option<String>,
}

impl<'a> RunLine<'a> {
    /// `--name NAME`: a kept sandbox of this name.
    pub fn name(self, name: &str) -> Self {
        self.flags(&["--name", name])
    }

    /// `--keep`: a kept sandbox with a generated name.
    pub fn keep(self) -> Self {
        self.flags(&["--keep"])
    }

    /// `-c FILE`: this config file instead of the project's.
    pub fn config(self, file: impl AsRef<std::path::Path>) -> Self {
        let file = file.as_ref().to_string_lossy().into_owned();
        self.flags(&["-c", &file])
    }

    /// `-e KEY=VALUE`.
    pub fn env(self, pair: &str) -> Self {
        self.flags(&["-e", pair])
    }

    /// Any other flags, in order.
    pub fn flags(mut self, flags: &[&str]) -> Self {
        self.flags.extend(flags.iter().map(|f| f.to_string()));
        self
    }

    /// `-i IMAGE` instead of BUSYBOX.
    pub fn image(mut self, image: &str) -> Self {
        self.image = Some(image.to_string());
        self
    }

    /// No `-i`: the image comes from config or detection.
    pub fn detected_image(mut self) -> Self {
        self.image = None;
        self
    }

    fn args(&self, command: &[&str]) -> Vec<String> {
        let mut args = vec!["run".to_string()];
        args.extend(self.flags.iter().cloned());
        if let Some(image) = &self.image {
            args.extend(["-i".to_string(), image.clone()]);
        }
        args.extend(command.iter().map(|c| c.to_string()));
        args
    }

    /// Runs it to completion.
    pub fn output(self, command: &[&str]) -> Output {
        let args = self.args(command);
        self.env
            .run(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Starts it with piped output (see [`TestEnv::spawn`]).
    pub fn spawn(self, command: &[&str]) -> Tracked {
        let args = self.args(command);
        self.env
            .spawn(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }
}

impl TestEnv {
    /// `agentkernel run` built up: see [`RunLine`].
    pub fn run_with(&self) -> RunLine<'_> {
        RunLine {
            env: self,
            flags: Vec::new(),
            image: Some(BUSYBOX.to_string()),
        }
    }

    /// `agentkernel exec NAME -- CMD…`.
    pub fn exec(&self, name: &str, command: &[&str]) -> Output {
        let mut args = vec!["exec", name, "--"];
        args.extend_from_slice(command);
        self.run(&args)
    }

    /// `agentkernel sandbox VERB NAME` (`stop`, `start`, `remove`, `info`).
    pub fn sandbox(&self, verb: &str, name: &str) -> Output {
        self.run(&["sandbox", verb, name])
    }
}
