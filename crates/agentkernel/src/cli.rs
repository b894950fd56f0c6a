//! The command line. Help text here is user documentation: keep it true.

use std::path::PathBuf;

use clap::builder::{BoolishValueParser, PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "agentkernel",
    version,
    about = "Run any command in a throwaway, isolated sandbox",
    long_about = "Run any command in a throwaway, isolated sandbox, and clean up after it.\n\n\
        Exit codes: the command's own; 125 when agentkernel itself fails (bad option or config, \
        unavailable backend, missing image…); 126 command not executable; 127 command not found; \
        128+N killed by signal N (137 also for the memory limit); 124 --timeout expired.",
    after_help = "Examples:\n  agentkernel run python3 -c \"print('hello')\"\n  agentkernel run --profile restrictive -- sh -c 'id'\n  agentkernel run --keep --ttl 30m -- npm install\n  agentkernel trust        # let ./agentkernel.toml loosen the sandbox\n  agentkernel doctor"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a command in a temporary sandbox, then remove it
    Run(Box<RunArgs>),
    /// Run a command in a kept sandbox
    Exec(ExecArgs),
    /// Manage kept sandboxes
    #[command(subcommand)]
    Sandbox(SandboxCommand),
    /// Verify or replay execution receipts (not supported yet)
    #[command(subcommand)]
    Receipt(ReceiptCommand),
    /// Manage the native backend's image store (pull, list, rm, prune)
    #[command(subcommand)]
    Image(ImageCommand),
    /// Templates for --template: list, show, add, remove, update, save
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Manage the local secret vault (not supported yet)
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Inspect or empty the warm container pool behind --fast
    #[command(subcommand)]
    Pool(PoolCommand),
    /// SSH into a sandbox started with --ssh (runs the system's ssh with its key, port and pinned host key)
    Ssh(SshArgs),
    /// Print an OpenSSH `Host` block for a sandbox started with --ssh (for ~/.ssh/config and editors)
    SshConfig {
        /// The kept sandbox's name
        name: String,
    },
    /// The SSH server of a sandbox started with --ssh (internal)
    #[command(name = "__ssh-server", hide = true)]
    SshServer { name: String, creator: String },
    /// Let DIR's agentkernel.toml loosen the sandbox (records its sha256; a changed file needs trust again)
    Trust(TrustArgs),
    /// Start a sandbox on each backend and check registry access: what works here, and how to fix the rest
    Doctor {
        /// Print the findings as JSON (field names documented in docs/config.md)
        #[arg(long)]
        json: bool,
    },
    /// Print shell completions
    Completions {
        /// The shell to complete for
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Image to use (auto-detected from the command or project files if not given)
    #[arg(short = 'i', long, value_name = "IMAGE")]
    pub image: Option<String>,

    /// Security profile: permissive, moderate (default), restrictive
    #[arg(short = 'p', long, value_name = "PROFILE", ignore_case = true,
          value_parser = lowercase_choice(&["permissive", "moderate", "restrictive"]))]
    pub profile: Option<String>,

    /// Keep the sandbox after the command exits (its name is printed on stderr)
    #[arg(short = 'k', long)]
    pub keep: bool,

    /// Use the warm container pool for faster start-up on docker/podman (default: true; --fast=false to skip it; native needs no pool)
    #[arg(short = 'F', long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub fast: Option<bool>,

    /// Config file, applied over the standard ones
    #[arg(short = 'c', long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Backend: native, docker, podman, firecracker, qemu, apple (default: $AGENTKERNEL_BACKEND, config, else the first available of native, docker, podman)
    #[arg(short = 'B', long, value_name = "BACKEND")]
    pub backend: Option<String>,

    /// Apply a template over the config files (flags still win): a path, a local or built-in name (`agentkernel template list`), or github:OWNER/REPO/PATH[@REF]
    #[arg(long, value_name = "NAME")]
    pub template: Option<String>,

    /// Expiry of a kept sandbox after its last use (e.g. 90s, 30m, 1h30m, 3d; default 1h). Implies --keep
    #[arg(long, value_name = "DURATION")]
    pub ttl: Option<String>,

    /// Name the kept sandbox <project>-<branch> from git and reuse it across runs. Implies --keep
    #[arg(long)]
    pub branch: bool,

    /// Name of the kept sandbox (default run-<8 hex>). Implies --keep
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// Disable network access (loopback only), under any profile
    #[arg(long)]
    pub no_network: bool,

    /// Publish a port: [IP:][HOST:]CONTAINER[/udp]; binds 127.0.0.1 unless an IP is given. Repeatable
    #[arg(short = 'P', long, value_name = "PORT")]
    pub publish: Vec<String>,

    /// Make the kept sandbox reachable over SSH on 127.0.0.1 (a server on the host side; nothing is installed in the image). Implies --keep; `agentkernel ssh NAME` connects
    #[arg(long)]
    pub ssh: bool,

    /// The port for --ssh (default: a free one, printed on stderr)
    #[arg(long, value_name = "PORT", requires = "ssh")]
    pub ssh_port: Option<u16>,

    /// Also accept the public keys in FILE for --ssh (e.g. ~/.ssh/authorized_keys)
    #[arg(long, value_name = "FILE", requires = "ssh")]
    pub ssh_authorized_keys: Option<PathBuf>,

    /// An environment variable SSH clients may send (SendEnv/SetEnv) for --ssh; NAME* matches a prefix. Others are refused. Repeatable
    #[arg(long, value_name = "NAME", requires = "ssh")]
    pub ssh_accept_env: Vec<String>,

    /// Bind a secret to a host via proxy: KEY:host, KEY=value:host, KEY:host:header (not supported yet)
    #[arg(short = 'S', long, value_name = "BINDING")]
    pub secret: Vec<String>,

    /// Inject a vault secret as a file inside the sandbox (not supported yet)
    #[arg(long, value_name = "KEY")]
    pub secret_file: Vec<String>,

    /// Placeholder tokens instead of real values for --secret-file (not supported yet)
    #[arg(long)]
    pub placeholder_secrets: bool,

    /// Write a signed execution receipt for this run (not supported yet)
    #[arg(long, value_name = "FILE")]
    pub receipt: Option<PathBuf>,

    /// Set an environment variable (KEY=VALUE, or KEY to copy it from here). Repeatable
    #[arg(short = 'e', long, value_name = "KEY=VALUE")]
    pub env: Vec<String>,

    /// Working directory inside the sandbox (default /workspace when the current directory is mounted)
    #[arg(short = 'w', long, value_name = "DIR")]
    pub workdir: Option<String>,

    /// Mount a host path: HOST:PATH[:ro]. Repeatable
    #[arg(short = 'v', long, value_name = "HOST:PATH[:ro]")]
    pub volume: Vec<String>,

    /// Memory limit (e.g. 512m, 2g); overrides the profile's
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,

    /// CPU limit (e.g. 0.5, 2); overrides the profile's
    #[arg(long, value_name = "CPUS")]
    pub cpus: Option<String>,

    /// Cap of each writable layer (root filesystem, copy-on-write workspace), e.g. 1g; writes past it fail with "No space left on device". Overrides the profile's (moderate 10g, restrictive 1g)
    #[arg(long, value_name = "SIZE")]
    pub disk: Option<String>,

    /// Kill the command and everything it started after this long (exit 124)
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,

    /// When to pull the image: missing (default), always, never
    #[arg(long, value_name = "POLICY", ignore_case = true,
          value_parser = lowercase_choice(&["missing", "always", "never"]))]
    pub pull: Option<String>,

    /// Print the resolved sandbox (image and where it came from, backend, policy, mounts, env names, ports, limits, kept name) as JSON on stdout and exit 0; nothing is created, pulled or run
    #[arg(long)]
    pub dry_run: bool,

    /// The command and its arguments, passed through untouched
    #[arg(value_name = "CMD", required = true, num_args = 1.., trailing_var_arg = true)]
    pub command: Vec<std::ffi::OsString>,
}

/// A project's `./agentkernel.toml` may tighten the sandbox on its own; a
/// weaker profile, host paths outside the project, published ports or higher
/// limits take effect only once you trust that exact file.
#[derive(Debug, Args)]
pub struct TrustArgs {
    /// The project directory (or its agentkernel.toml); default: the current directory
    #[arg(value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// List the trusted files and whether each is unchanged since
    #[arg(long, conflicts_with_all = ["dir", "revoke"])]
    pub list: bool,

    /// Withdraw the trust instead
    #[arg(long)]
    pub revoke: bool,
}

#[derive(Debug, Args)]
pub struct SshArgs {
    /// The kept sandbox's name
    pub name: String,

    /// Print an OpenSSH `Host` block instead of connecting (same as `agentkernel ssh-config NAME`)
    #[arg(long)]
    pub config: bool,

    /// A command to run instead of a shell (its exit status is ssh's)
    #[arg(value_name = "CMD", last = true)]
    pub command: Vec<std::ffi::OsString>,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Set an environment variable (KEY=VALUE, or KEY to copy it from here). Repeatable
    #[arg(short = 'e', long, value_name = "KEY=VALUE")]
    pub env: Vec<String>,

    /// Working directory inside the sandbox
    #[arg(short = 'w', long, value_name = "DIR")]
    pub workdir: Option<String>,

    /// Kill the command and everything it started after this long (exit 124)
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,

    /// The kept sandbox (its name, as `sandbox list` shows it)
    pub name: String,

    /// The command and its arguments
    #[arg(value_name = "CMD", required = true, num_args = 1.., trailing_var_arg = true)]
    pub command: Vec<std::ffi::OsString>,
}

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// List kept sandboxes
    List {
        /// Print a JSON array instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Show one kept sandbox
    Info {
        /// The kept sandbox's name
        name: String,
        /// Print a JSON object instead of text
        #[arg(long)]
        json: bool,
    },
    /// Freeze a kept sandbox (its processes and files are kept)
    Stop {
        /// The kept sandbox's name
        name: String,
    },
    /// Thaw a stopped sandbox
    Start {
        /// The kept sandbox's name
        name: String,
    },
    /// Remove kept sandboxes
    #[command(alias = "rm")]
    Remove {
        /// The kept sandboxes' names
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove expired sandboxes and what killed agentkernel processes left behind
    Gc {
        /// Wait for this stopped sandbox's deadline, then collect it (started by `sandbox stop`)
        #[arg(long, hide = true, value_name = "NAME")]
        expire: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Warm and in-use containers, targets and hit rates per pool key, and the cap
    Status {
        /// Print a JSON object instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Remove every warm container
    Prune,
    /// Remove a used container and top its key back up (run detached by `run`)
    #[command(hide = true)]
    Refill {
        key: String,
        #[arg(long)]
        used: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReceiptCommand {
    /// Verify a receipt's integrity
    Verify { file: PathBuf },
    /// Replay the recorded invocation and compare
    Replay { file: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Pull an image into the store (mirrors: [images] mirrors or AGENTKERNEL_REGISTRY_MIRRORS)
    Pull {
        /// Image reference, e.g. alpine:3.20 or registry.example:5000/team/app:1
        image: String,
        /// Re-resolve the tag even if the image is stored
        #[arg(long)]
        always: bool,
    },
    /// List stored images
    List {
        /// Print a JSON array instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Remove images from the store (their layers go with `image prune`)
    Rm {
        /// Image references, as `image list` shows them
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Delete blobs and layers no stored image uses
    Prune,
}

/// A template is an agentkernel.toml applied between the config files and
/// the flags. NAME is looked up as a path (with `/` or ending in .toml), a
/// local template (~/.config/agentkernel/templates/NAME.toml, then
/// ~/.local/share/agentkernel/templates/), a built-in, or
/// github:OWNER/REPO/PATH[@REF] (fetched once, then used pinned and offline).
#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// List the local, built-in and fetched github: templates
    List {
        /// Print a JSON array instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Print a template (source and sha256 first, as TOML comments)
    Show {
        /// Name, path or github: spec
        name: String,
    },
    /// Copy a template (a path or github: spec) into ~/.config/agentkernel/templates
    Add {
        /// Path or github:OWNER/REPO/PATH[@REF]
        spec: String,
        /// The local name (default: the file's name)
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
    },
    /// Remove a local template, or a fetched github: template's cached copy
    #[command(alias = "rm")]
    Remove {
        /// Local name or github: spec
        name: String,
    },
    /// Fetch a github: template again, show what changed, and pin the new copy
    Update {
        /// A github: spec, or a local template added from one
        name: String,
    },
    /// Write a local template from a kept sandbox's settings (image, profile, TTL, memory; never environment values)
    Save {
        /// The kept sandbox
        #[arg(long = "from", value_name = "SANDBOX")]
        from: String,
        /// Add this variable to the template (values are never copied from the sandbox). Repeatable
        #[arg(short = 'e', long, value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// The template's name
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    Set { key: String },
    Get { key: String },
    List,
    Rm { key: String },
}

/// One of `choices`, matched case-insensitively (with `ignore_case`) and
/// handed on in lower case, the form the rest of the program parses.
fn lowercase_choice(choices: &[&'static str]) -> impl TypedValueParser<Value = String> {
    PossibleValuesParser::new(choices.iter().copied()).map(|v| v.to_ascii_lowercase())
}
