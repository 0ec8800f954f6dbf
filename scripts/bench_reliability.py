"""Load on a real validator: many large uploads at once, with its memory and its small calls watched.

  python scripts/bench_reliability.py [--uploads 32] [--mb 64] [--out docs/benchmarks.json]

Starts `expertmesh validator run` (the shipped model, default server limits: 8 upload slots, 4 per
address) and sends `--uploads` uploads of `--mb` MB each at once, each from its own key with its own
commitment (proof of work lowered to 8 bits: this measures the transport, not the proof), through
`ValidatorClient`, which resends an upload the validator answers busy. The payloads are random
bytes, so each is streamed to the spool in full, its sha256 checked, and then refused when its delta
header is read ("invalid delta": the header is read only after the whole payload is in and its sha256
matched): the work of a real upload, without a model that large. Meanwhile one thread keeps
calling GetRound. Reports the validator's peak RSS (VmHWM), how many uploads were streamed in full,
the slowest GetRound and upload, and the wall time. Writes
docs/benchmarks.json["reliability"]["load"].
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

from expertmesh.node.domains import MATH_TEMPLATE
from expertmesh.node.paths import corpus
from expertmesh.protocol import identity
from expertmesh.protocol.client import ClientConfig, ValidatorClient, sign_commit, sign_upload
from expertmesh.protocol.errors import RemoteError

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM")) / 1024


def start_validator(root: Path, max_bytes: int) -> tuple[subprocess.Popen, str]:
    config = root / "validator.toml"
    math = corpus("gsm8k_train.jsonl.gz")
    config.write_text(f'state_dir = "{root / "state"}"\nthreads = 1\n[server]\nmax_delta_bytes = {max_bytes}\n'
                      '[rounds]\nduration_s = 86400\n[admission]\npow_bits = 8\n[log]\nformat = "text"\n'
                      f'[[datasets.preload]]\ndomain = "math"\npath = "{math}"\ntemplate = {json.dumps(MATH_TEMPLATE)}\n')
    log = open(root / "validator.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "expertmesh", "validator", "run", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=log, cwd=REPO)
    for line in proc.stdout:
        if line.startswith(b"expertmesh-validator: serving on "):
            return proc, line.decode().split()[-1]
    raise SystemExit(f"validator did not start; see {root / 'validator.log'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uploads", type=int, default=32)
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.json")
    args = ap.parse_args()
    size = args.mb << 20
    with tempfile.TemporaryDirectory(prefix="bench-reliability-") as tmp:
        root = Path(tmp)
        payloads = []
        for i in range(args.uploads):  # distinct random files, written before the clock starts
            p = root / f"payload-{i}"
            with open(p, "wb") as f:
                for _ in range(args.mb):
                    f.write(os.urandom(1 << 20))
            payloads.append(p)
        proc, address = start_validator(root, size + (1 << 20))
        try:
            rss_idle = peak_rss_mib(proc.pid)
            cfg = ClientConfig(call_timeout_s=60, upload_timeout_s=600, busy_retries=60)
            results: list[tuple[str, float]] = []
            small: list[float] = []
            stop = threading.Event()

            def poll_round() -> None:
                with ValidatorClient(address, ClientConfig(call_timeout_s=60)) as c:
                    while not stop.is_set():
                        t = time.perf_counter()
                        c.get_round()
                        small.append(time.perf_counter() - t)
                        stop.wait(0.2)

            def upload(path: Path) -> None:
                key = identity.generate_key()
                t = time.perf_counter()
                with ValidatorClient(address, cfg) as c:
                    info = c.get_round()
                    fields = dict(model_version=info.model_version, model_sha256=info.model_sha256,
                                  round=info.round, domain="math")
                    c.commit_delta(sign_commit(key, path, **fields, pow_bits=info.pow_bits))
                    env = sign_upload("delta", key, path, **fields)
                    try:
                        c.submit_delta(path, env)
                        outcome = "taken"
                    except RemoteError as exc:  # random bytes: refused once the header is read
                        outcome = f"{exc.code}: {exc.details[:60]}"
                results.append((outcome, time.perf_counter() - t))

            poller = threading.Thread(target=poll_round)
            poller.start()
            t0 = time.perf_counter()
            threads = [threading.Thread(target=upload, args=(p,)) for p in payloads]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            wall = time.perf_counter() - t0
            stop.set()
            poller.join()
            rss_peak = peak_rss_mib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(60)
    outcomes = {k: sum(1 for o, _ in results if o == k) for k in {o for o, _ in results}}
    streamed = sum(n for o, n in outcomes.items() if o.startswith("INVALID_ARGUMENT: invalid delta") or o == "taken")
    result = {
        "date": date.today().isoformat(), "machine": platform.machine(), "cores": os.cpu_count(),
        "uploads": args.uploads, "mb_each": args.mb, "seconds": round(wall, 1),
        "outcomes": outcomes, "streamed_in_full": streamed,
        "throughput_mb_s": round(streamed * args.mb / wall, 1),
        "validator_rss_idle_mib": round(rss_idle), "validator_rss_peak_mib": round(rss_peak),
        "get_round_calls": len(small), "get_round_max_s": round(max(small), 3) if small else None,
        "get_round_median_s": round(sorted(small)[len(small) // 2], 4) if small else None,
        "slowest_upload_s": round(max(s for _, s in results), 1),
    }
    print(json.dumps(result, indent=1))
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    doc.setdefault("reliability", {})["load"] = result
    args.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
