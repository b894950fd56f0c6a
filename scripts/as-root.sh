# Sourced by the scripts that need root (setup.sh, quickstart.sh): `as_root
# "$0" "$@"` returns at once as root; otherwise it re-executes the script
# through sudo when sudo exists (a fresh Debian root login has no sudo, a
# desktop user has no root shell: the same command works for both), and
# without sudo says what to do.
as_root() {
  [ "$(id -u)" -eq 0 ] && return 0
  if command -v sudo >/dev/null 2>&1; then
    exec sudo --preserve-env=AGENTKERNEL_DOCKERD_PIDFILE,AGENTKERNEL_REGISTRY_PIDFILE -- "$@"
  fi
  echo "$(basename "$1"): needs root and sudo is not installed: run it as root (su -)" >&2
  exit 1
}
