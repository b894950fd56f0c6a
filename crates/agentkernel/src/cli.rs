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

impl Cli {
    /// `agentkernel run …` parsed by the `run` subcommand's arguments alone.
    /// Building every subcommand's arguments, as `try_parse` does, costs
    /// about half a millisecond — a twentieth of a whole native run, paid
    /// before anything else starts. Only a clean parse is taken from here:
    /// anything else (another subcommand, `--help`, a usage error) is None,
    /// and the full parser then handles it, so help and errors read exactly
    /// as they always do. `Cli` sets nothing that changes how a subcommand
    /// parses (no global arguments or settings), which the tests hold.
    pub fn try_parse_run_alone(args: impl IntoIterator<Item = std::ffi::OsString>) -> Option<Cli> {
        let mut args = args.into_iter().skip(1).peekable();
        if args.peek()? != "run" {
            return None;
        }
        let run = RunArgs::augment_args(clap::Command::new("run"));
        let matches = run.try_get_matches_from(args).ok()?;
        let run = <RunArgs as clap::FromArgMatches>::from_arg_matches(&matches).ok()?;
        Some(Cli {
            command: Command::Run(Box::new(run)),
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a command in a temporary sandbox, then remove it
    Run(Box<RunArgs>),
    /// Run a command in a kept sandbox
    Exec(ExecArgs),
    /// Open an interactive shell (/bin/sh) in a kept sandbox: `exec NAME -- /bin/sh`
    Attach {
        /// Set an environment variable (KEY=VALUE, or KEY to copy it from here). Repeatable
        #[arg(short = 'e', long, value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// The kept sandbox's name
        name: String,
    },
    /// Manage kept sandboxes (alias: sb)
    #[command(subcommand, visible_alias = "sb")]
    Sandbox(SandboxCommand),
    /// Verify or replay signed execution receipts (--receipt), print the signing key
    #[command(subcommand)]
    Receipt(ReceiptCommand),
    /// Manage the native backend's image store (pull, list, rm, prune)
    #[command(subcommand)]
    Image(ImageCommand),
    /// Templates for --template: list, show, add, remove, update, save
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Manage the local secret vault (encrypted; values are never printed)
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Inspect or empty the warm pools behind --fast (containers, VMs, native sandboxes)
    #[command(subcommand)]
    Pool(PoolCommand),
    /// SSH into a sandbox started with --ssh (runs the system's ssh with its key, port and pinned host key)
    Ssh(SshArgs),
    /// Print an OpenSSH `Host` block for a sandbox started with --ssh (for ~/.ssh/config and editors)
    SshConfig {
        /// The kept sandbox's name
        name: String,
    },
    /// Write ./agentkernel.toml (upstream's schema) for this project; --force replaces an existing one
    Init(InitArgs),

    /// The SSH server of a sandbox started with --ssh (internal)
    #[command(name = "__ssh-server", hide = true)]
    SshServer { name: String, creator: String },
    /// Let DIR's agentkernel.toml loosen the sandbox (records its sha256; a changed file needs trust again)
    Trust(TrustArgs),
    /// Start a sandbox on each backend and check registry access: what works here, and how to fix the rest
    Doctor {
        /// Print the findings as JSON (field names: docs/json.md)
        #[arg(long)]
        json: bool,
    },
    /// Serve the HTTP API (docs/api.md): on a unix socket in the state directory, or on TCP with a bearer token
    Serve(ServeArgs),
    /// Serve the Model Context Protocol on stdin/stdout, for AI agents (docs/mcp.md)
    Mcp,
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

    /// Use the warm pool for faster start-up (default on for docker, podman and qemu; on native only when given: it pays off when runs are spaced out; --fast=false skips it)
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

    /// Send secret KEY to HOST through the host-side proxy: KEY:HOST (Authorization: Bearer), KEY:HOST:HEADER, or KEY=VALUE:HOST (inline, never stored). Value from the vault, else this environment; inside, $KEY holds a placeholder. Repeatable
    #[arg(short = 'S', long, value_name = "BINDING")]
    pub secret: Vec<String>,

    /// Put secret KEY at /run/agentkernel/secrets/KEY (tmpfs, mode 0400, owned by the command's user; AGENTKERNEL_SECRETS_PATH names the directory). Repeatable
    #[arg(long, value_name = "KEY")]
    pub secret_file: Vec<String>,

    /// --secret-file files hold a per-run placeholder instead of the value; the proxy swaps it back only for the key's bound hosts
    #[arg(long)]
    pub placeholder_secrets: bool,

    /// Egress allow-list: the sandbox reaches only these hosts, through agentkernel's proxy (HOST, *.DOMAIN, optional :PORT). Repeatable
    #[arg(long, value_name = "HOST")]
    pub allow_host: Vec<String>,

    /// Log each connection and request through the egress proxy as one JSON line (secret names, never values)
    #[arg(long, value_name = "FILE")]
    pub egress_log: Option<PathBuf>,

    /// Write a signed execution receipt of this run to FILE (also when it fails; see docs/receipts.md)
    #[arg(long, value_name = "FILE")]
    pub receipt: Option<PathBuf>,

    /// Receipt format: json (default), or dsse to also write FILE.dsse.json, an in-toto Statement in a DSSE envelope
    #[arg(long, value_name = "FORMAT", value_parser = ["json", "dsse"], requires = "receipt")]
    pub receipt_format: Option<String>,

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

#[derive(Debug, Args)]
pub struct InitArgs {
    /// The sandbox's name (default: the directory's name)
    #[arg(short = 'n', long, value_name = "NAME")]
    pub name: Option<String>,

    /// Upstream's agent type, recorded as [agent] preferred: claude, gemini, codex, opencode
    #[arg(short = 'a', long, value_name = "AGENT")]
    pub agent: Option<String>,

    /// Lay a template over the config, as for `run --template` (its setup runs once, in the new sandbox)
    #[arg(short = 't', long, value_name = "NAME")]
    pub template: Option<String>,

    /// Replace an existing agentkernel.toml
    #[arg(long)]
    pub force: bool,
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

/// Each request runs this binary's CLI, so options, validation and messages
/// are the CLI's. Without --listen the API is on a unix socket (mode 0600)
/// in the state directory, printed on stderr.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Listen on TCP ADDR:PORT instead (e.g. 127.0.0.1:8880); requires --token-file
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<String>,

    /// File (mode 0600) holding the bearer token every request must send as `Authorization: Bearer TOKEN`
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
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

    /// Run as root (uid 0) where the image's user is not root; the profile's capabilities and seccomp filter still apply
    #[arg(long)]
    pub sudo: bool,

    /// Start the command and return at once (exit 0); it runs on in the sandbox, output discarded
    #[arg(short = 'd', long)]
    pub detach: bool,

    /// Write a signed execution receipt of this command to FILE (see docs/receipts.md)
    #[arg(long, value_name = "FILE")]
    pub receipt: Option<PathBuf>,

    /// Receipt format: json (default), or dsse to also write FILE.dsse.json
    #[arg(long, value_name = "FORMAT", value_parser = ["json", "dsse"], requires = "receipt")]
    pub receipt_format: Option<String>,

    /// The kept sandbox (its name, as `sandbox list` shows it)
    pub name: String,

    /// The command and its arguments
    #[arg(value_name = "CMD", required = true, num_args = 1.., trailing_var_arg = true)]
    pub command: Vec<std::ffi::OsString>,
}

/// `sandbox create`: the options of `run` that describe a sandbox, with
/// upstream's spelling where it differs (`-p` publishes a port here, as
/// upstream's `sandbox create` has it; the profile is `--profile`).
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The sandbox's name (default: `[sandbox] name` from the config, else run-<8 hex>)
    #[arg(value_name = "NAME")]
    pub name: Option<String>,

    /// Image to use (auto-detected from the project files if not given)
    #[arg(short = 'i', long, value_name = "IMAGE")]
    pub image: Option<String>,

    /// Security profile: permissive, moderate (default), restrictive
    #[arg(long, value_name = "PROFILE", ignore_case = true,
          value_parser = lowercase_choice(&["permissive", "moderate", "restrictive"]))]
    pub profile: Option<String>,

    /// Backend: native, docker, podman (default as for `run`)
    #[arg(short = 'B', long, value_name = "BACKEND")]
    pub backend: Option<String>,

    /// Config file, applied over the standard ones
    #[arg(short = 'c', long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Project directory mounted at /workspace (default: the current directory)
    #[arg(short = 'd', long, value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// Expiry after last use (e.g. 3600, 90s, 30m, 3d; 0 = never; default 1h)
    #[arg(long, value_name = "DURATION")]
    pub ttl: Option<String>,

    /// Name the sandbox <project>-<branch> from git
    #[arg(long, conflicts_with = "name")]
    pub branch: bool,

    /// Publish a port: [IP:][HOST:]CONTAINER[/udp]; binds 127.0.0.1 unless an IP is given. Repeatable
    #[arg(short = 'p', short_alias = 'P', long, value_name = "PORT")]
    pub publish: Vec<String>,

    /// Mount a host path: HOST:PATH[:ro]. Repeatable
    #[arg(short = 'v', long, value_name = "HOST:PATH[:ro]")]
    pub volume: Vec<String>,

    /// Set an environment variable for every command (KEY=VALUE, or KEY to copy it from here). Repeatable
    #[arg(short = 'e', long, value_name = "KEY=VALUE")]
    pub env: Vec<String>,

    /// Working directory of commands inside the sandbox
    #[arg(short = 'w', long, value_name = "DIR")]
    pub workdir: Option<String>,

    /// Memory limit (e.g. 512m, 2g); overrides the profile's
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,

    /// CPU limit (e.g. 0.5, 2); overrides the profile's
    #[arg(long, value_name = "CPUS")]
    pub cpus: Option<String>,

    /// Cap of each writable layer (native; see `run --help`)
    #[arg(long, value_name = "SIZE")]
    pub disk: Option<String>,

    /// Disable network access (loopback only), under any profile
    #[arg(long)]
    pub no_network: bool,

    /// When to pull the image: missing (default), always, never
    #[arg(long, value_name = "POLICY", ignore_case = true,
          value_parser = lowercase_choice(&["missing", "always", "never"]))]
    pub pull: Option<String>,

    /// Create it stopped (`sandbox start NAME` starts it)
    #[arg(long)]
    pub no_start: bool,

    /// Upstream's agent type: accepted, has no effect here (use --image)
    #[arg(short = 'a', long, value_name = "AGENT")]
    pub agent: Option<String>,

    /// Apply a template over the config files, as `run --template` does; its setup runs once, now
    #[arg(long, value_name = "NAME")]
    pub template: Option<String>,

    /// Enable SSH access (not supported yet)
    #[arg(long)]
    pub ssh: bool,

    /// Clone a git repository into the sandbox (not supported yet)
    #[arg(long, value_name = "URL")]
    pub source: Option<String>,

    /// Git ref to check out after --source (not supported yet)
    #[arg(long, value_name = "REF")]
    pub git_ref: Option<String>,

    /// Bind a secret to a host via proxy (not supported yet)
    #[arg(short = 'S', long, value_name = "BINDING")]
    pub secret: Vec<String>,

    /// Inject a vault secret as a file (not supported yet)
    #[arg(long, value_name = "KEY")]
    pub secret_file: Vec<String>,

    /// Placeholder tokens for --secret-file (not supported yet)
    #[arg(long)]
    pub placeholder_secrets: bool,

    /// Add a label key=value (not supported yet)
    #[arg(short = 'l', long, value_name = "KEY=VALUE")]
    pub label: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Create a kept sandbox without running a command (then `exec NAME -- CMD`)
    Create(Box<CreateArgs>),
    /// List kept sandboxes
    List {
        /// Print a JSON array instead of a table (fields: docs/json.md)
        #[arg(long)]
        json: bool,
    },
    /// Show one kept sandbox
    Info {
        /// The kept sandbox's name
        name: String,
        /// Print a JSON object instead of text (fields: docs/json.md)
        #[arg(long)]
        json: bool,
    },
    /// Stop a kept sandbox: its processes end, its files stay (it still expires at its TTL)
    Stop {
        /// The kept sandbox's name
        name: String,
    },
    /// Start a stopped (or paused) sandbox: commands run in it again
    Start {
        /// The kept sandbox's name
        name: String,
        /// Accepted for upstream compatibility; the sandbox stays on the backend it was created on
        #[arg(short = 'B', long, value_name = "BACKEND", hide = true)]
        backend: Option<String>,
    },
    /// Freeze a kept sandbox (its processes and files are kept, no CPU used)
    Pause {
        /// The kept sandbox's name
        name: String,
    },
    /// Thaw a paused sandbox
    Resume {
        /// The kept sandbox's name
        name: String,
    },
    /// Lengthen a kept sandbox's TTL and its current expiry
    ExtendTtl {
        /// The kept sandbox's name
        name: String,
        /// How much longer (e.g. 30m, 2h, 3d; default 1h)
        #[arg(value_name = "DURATION", conflicts_with = "by")]
        duration: Option<String>,
        /// The same as DURATION (upstream's spelling)
        #[arg(long, value_name = "DURATION")]
        by: Option<String>,
    },
    /// Remove stopped, paused and expired sandboxes (with --force the running ones too), naming each
    Clean {
        /// Remove running sandboxes too
        #[arg(short = 'f', long)]
        force: bool,
        /// Upstream also removes images and build cache: not here (says how)
        #[arg(long)]
        all: bool,
    },
    /// Copy a file or directory into or out of a kept sandbox: `cp FILE NAME:/path`, `cp NAME:/path FILE`
    Cp {
        /// Source: a host path, or NAME:/path in the sandbox
        src: String,
        /// Destination: a host path, or NAME:/path in the sandbox
        dest: String,
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
    /// Warm and in-use containers, targets and hit rates per pool key, the cap, and native's disk keeper
    Status {
        /// Print a JSON object instead of a table (fields: docs/json.md)
        #[arg(long)]
        json: bool,
    },
    /// Remove every warm container, VM and native sandbox, and the workspace disks native runs attached or mounted ahead
    Prune,
    /// Hold workspace disks mounted ahead for native runs (started detached by `run`)
    #[command(hide = true)]
    HoldDisks {
        #[arg(long)]
        bytes: u64,
    },
    /// Remove a used container and top its key back up (run detached by `run`)
    #[command(hide = true)]
    Refill {
        key: String,
        #[arg(long)]
        used: Option<String>,
    },
    /// Build warm native sandboxes of a key up to its target (run detached by `run`)
    #[command(hide = true)]
    RefillNative { key: String },
}

#[derive(Debug, Subcommand)]
pub enum ReceiptCommand {
    /// Print this machine's receipt signing key (public half) and its id; created on first use
    Key {
        /// Print {"algorithm", "public_key", "key_id"} as JSON
        #[arg(long)]
        json: bool,
    },
    /// Check a receipt's hash, signature and signer; exit 0 only when all three hold
    Verify {
        /// The receipt (or its .dsse.json envelope)
        file: PathBuf,
        /// Also trust this public key (a file with `receipt key` output, or base64). Repeatable
        #[arg(long, value_name = "PUBFILE")]
        key: Vec<String>,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Run the receipt's command again on its image pinned by digest and compare: exit 0 all match, 1 not, 125 cannot replay
    Replay {
        /// The receipt
        file: PathBuf,
        /// Value of a recorded environment variable (KEY=VALUE, or KEY to copy it from here); others come from this environment. Repeatable
        #[arg(short = 'e', long, value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Also trust this public key for the receipt's signer. Repeatable
        #[arg(long, value_name = "PUBFILE")]
        key: Vec<String>,
    },
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
        /// Print a JSON array instead of a table (fields: docs/json.md)
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
    /// Store a secret (VALUE, else read from stdin without echo; a trailing newline is dropped)
    Set {
        /// The secret's name, like an environment variable (OPENAI_API_KEY)
        key: String,
        /// The value; leave it out to keep it off the command line and shell history
        value: Option<String>,
    },
    /// Refused: agentkernel never prints a secret's value
    #[command(hide = true)]
    Get { key: String },
    /// The stored secrets' names, when each was set, and the hosts config binds it to (never values)
    List {
        /// Print a JSON array instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Remove a secret from the vault
    #[command(alias = "remove")]
    Rm {
        /// The secret's name
        key: String,
    },
}

/// One of `choices`, matched case-insensitively (with `ignore_case`) and
/// handed on in lower case, the form the rest of the program parses.
fn lowercase_choice(choices: &[&'static str]) -> impl TypedValueParser<Value = String> {
    PossibleValuesParser::new(choices.iter().copied()).map(|v| v.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(words: &[&str]) -> Vec<std::ffi::OsString> {
        std::iter::once("agentkernel")
            .chain(words.iter().copied())
            .map(Into::into)
            .collect()
    }

    /// The `run` fast path parses every accepted command line exactly as the
    /// full parser does.
    #[test]
    fn run_alone_parses_as_the_full_command_line_does() {
        let lines: &[&[&str]] = &[
            &["run", "true"],
            &["run", "-i", "alpine:3.20", "--", "sh", "-c", "echo hi"],
            &[
                "run",
                "-p",
                "RESTRICTIVE",
                "--memory",
                "64m",
                "--cpus",
                "0.5",
                "ls",
            ],
            &[
                "run", "-e", "A=1", "-e", "B", "-w", "/tmp", "python3", "-c", "print(1)",
            ],
            &[
                "run",
                "--no-network",
                "-k",
                "--ttl",
                "30m",
                "--name",
                "x",
                "ls",
                "-la",
            ],
            &[
                "run",
                "-P",
                "8080:80",
                "-v",
                "/tmp:/mnt:ro",
                "--timeout",
                "5s",
                "cmd",
                "--its-flag",
            ],
            &[
                "run",
                "--fast=false",
                "-B",
                "native",
                "--pull",
                "NEVER",
                "true",
            ],
            &[
                "run",
                "-F",
                "--dry-run",
                "--receipt",
                "r.json",
                "--receipt-format",
                "dsse",
                "x",
            ],
            &[
                "run",
                "--ssh",
                "--ssh-port",
                "2222",
                "-S",
                "K=v",
                "--allow-host",
                "h",
                "sh",
            ],
            &["run", "echo", "-i", "--help", "-p", "x"],
            // `--fast` takes its value only with `=`: here "false" is the command.
            &["run", "--fast", "false", "true"],
        ];
        for words in lines {
            let full =
                Cli::try_parse_from(argv(words)).unwrap_or_else(|e| panic!("{words:?}: {e}"));
            let fast = Cli::try_parse_run_alone(argv(words))
                .unwrap_or_else(|| panic!("{words:?}: the fast path refused it"));
            assert_eq!(format!("{fast:?}"), format!("{full:?}"), "{words:?}");
        }
    }

    /// Everything but a clean `run` parse is left to the full parser, so
    /// help and errors are the full parser's.
    #[test]
    fn run_alone_leaves_help_errors_and_other_commands_to_the_full_parser() {
        let lines: &[&[&str]] = &[
            &[],
            &["run"],
            &["run", "--help"],
            &["run", "-h"],
            &["run", "--no-such-flag", "true"],
            &["run", "-p", "strict", "true"],
            &["run", "--ssh-port", "22", "true"],
            &["exec", "name", "--", "true"],
            &["doctor"],
            &["--version"],
            &["runx", "true"],
        ];
        for words in lines {
            assert!(
                Cli::try_parse_run_alone(argv(words)).is_none(),
                "{words:?} was taken by the fast path"
            );
        }
    }
}
