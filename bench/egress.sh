#!/usr/bin/env bash
# The egress proxy beside a direct connection to the same loopback HTTPS
# upstream, in one run: added latency per request on a kept-alive connection
# (intercepted), the first request including the intercepted TLS handshakes,
# and a 100 MB download direct, through the tunnel and intercepted.
# (A plain `agentkernel run true` starts no proxy: bench/startup.py measures it.)
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo test --release -p agentkernel-egress --test bench -- --ignored --nocapture --test-threads 1
