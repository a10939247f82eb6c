"""`serve --workers N`: N sidecar processes, worker i on the gRPC and admin ports + i.

Why not SO_REUSEPORT on one port: the kernel spreads connections, not requests, and Envoy
keeps one long-lived HTTP/2 connection per worker thread, so whole connections (and their
CPU) land on one process. N ports listed as N endpoints of Envoy's cluster balance per
request (`envoy-config --workers N` lists them). Each worker has its own token cache and
reports ready once its own tokens are warm.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import time

from .contract import SEAL_KEY_ENV

log = logging.getLogger(__name__)

FORWARDED_SIGNALS = (
    signal.SIGTERM,  # drain and exit: every worker drains its own checks
    signal.SIGINT,
    signal.SIGHUP,  # reload: every worker re-reads the config
)


def run_workers(
    count: int, config_path: str | None, grace_s: float, log_level: str, loop: str
) -> int:
    """Start `count` workers, forward signals to them, and exit when they have all exited.

    If one worker dies on its own, the others are stopped and the exit status is non-zero:
    a half-running set of endpoints is worse than a clear restart.
    """
    argv = [sys.executable, "-m", "ext_authz", "--log-level", log_level, "serve",
            "--grace", str(grace_s), "--loop", loop]
    if config_path is not None:
        argv += ["--config", config_path]
    workers: list[subprocess.Popen[bytes]] = []
    stopping = False

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    # Handlers first: a signal that arrives while workers start still reaches them.
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    # One sealing key for them all: any worker puts back a fresh name another sealed.
    env = {**os.environ, SEAL_KEY_ENV: os.environ.get(SEAL_KEY_ENV) or secrets.token_hex(32)}
    workers.extend(subprocess.Popen([*argv, "--worker", str(i)], env=env) for i in range(count))
    log.info("started %d workers: pids %s", count, [w.pid for w in workers])
    failed = False
    while any(w.poll() is None for w in workers):
        if not stopping and any(w.poll() is not None for w in workers):
            dead = [i for i, w in enumerate(workers) if w.poll() is not None]
            log.error("worker(s) %s exited; stopping the others", dead)
            forward(signal.SIGTERM, None)
            stopping = True
            failed = True
        time.sleep(0.1)
    if failed or any(w.returncode != 0 for w in workers):
        return 1
    return 0
