#!/usr/bin/env python3
"""The HTTP API's overhead: `POST /v1/run` of `true` beside `agentkernel run
true`, interleaved in blocks (a block of CLI runs, then a block of API runs,
again and again) so that a drifting machine weighs on both sides alike.
Prints each side's median, the difference (the API's overhead) and the ratio.

  bench/api.py [--binary target/release/agentkernel] [--image IMAGE]
               [--backend native] [--blocks 10] [--per-block 10]

It starts `agentkernel serve` itself (on its unix socket, with the caller's
AGENTKERNEL_HOME and environment), and stops it by PID at the end. The API
client keeps one connection open, as a client library would.
"""
import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost")
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.unix_path)


def start_server(binary, env):
    server = subprocess.Popen([binary, "serve"], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = server.stderr.readline()
    marker = "unix socket "
    if marker not in line:
        server.kill()
        sys.exit(f"api.py: serve did not start: {line.strip()}")
    return server, line.split(marker, 1)[1].strip()


def api_run(conn, body):
    start = time.perf_counter_ns()
    conn.request("POST", "/v1/run", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    elapsed = (time.perf_counter_ns() - start) / 1e6
    last = json.loads(data.splitlines()[-1]) if response.status == 200 else {}
    if last.get("code") != 0:
        sys.exit(f"api.py: POST /v1/run failed: {response.status} {data[:300]!r}")
    return elapsed


DEVNULL = os.open(os.devnull, os.O_RDWR)
STDIO_ON_DEVNULL = [(os.POSIX_SPAWN_DUP2, DEVNULL, fd) for fd in (0, 1, 2)]


def cli_run(argv, env):
    """posix_spawn, as bench/interleaved.py: Python's own start-up cost of a
    child stays out of the CLI's figure."""
    start = time.perf_counter_ns()
    pid = os.posix_spawn(argv[0], argv, env, file_actions=STDIO_ON_DEVNULL)
    _, status = os.waitpid(pid, 0)
    elapsed = (time.perf_counter_ns() - start) / 1e6
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"api.py: {' '.join(argv)} exited {os.waitstatus_to_exitcode(status)}")
    return elapsed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default="target/release/agentkernel")
    parser.add_argument("--image", default="agentkernel-test/busybox:1")
    parser.add_argument("--backend", default="native")
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--per-block", type=int, default=10)
    args = parser.parse_args()
    binary = os.path.abspath(args.binary)
    env = dict(os.environ, AGENTKERNEL_BACKEND=args.backend)
    server, socket_path = start_server(binary, env)
    try:
        conn = UnixConnection(socket_path)
        body = json.dumps({"command": ["true"], "image": args.image})
        argv = [binary, "run", "--image", args.image, "true"]
        for _ in range(3):  # warm-up: page cache, image store
            cli_run(argv, env)
            api_run(conn, body)
        cli, api = [], []
        for _ in range(args.blocks):
            cli += [cli_run(argv, env) for _ in range(args.per_block)]
            api += [api_run(conn, body) for _ in range(args.per_block)]
        cli_median, api_median = statistics.median(cli), statistics.median(api)
        print(f"backend {args.backend}, {args.blocks} blocks of {args.per_block} runs each side")
        print(f"agentkernel run true : median {cli_median:.2f} ms")
        print(f"POST /v1/run true    : median {api_median:.2f} ms")
        print(f"API overhead         : {api_median - cli_median:+.2f} ms "
              f"(ratio {api_median / cli_median:.3f})")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
