"""TLS against plaintext on a worker link: round trip and bulk bandwidth, side by side.

    .venv/bin/python bench/tls_links.py --rounds 6

Two real worker gRPC servers on loopback in this process, one serving TLS (the default)
and one plaintext (``plaintext=True``), both with a token. Each round measures the link to
each in turn, as ``orch cluster`` does (``WorkerClient.measure_link``: best of three empty
pings, then one payload); reported are the medians.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from _common import console, print_header
from rich.table import Table

from orchestrator.cluster.client import WorkerClient
from orchestrator.settings import OrchSettings
from testkit.cluster import worker_server

TOKEN = "bench-tls-links-token-0123456789"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--payload-mib", type=int, default=8)
    args = ap.parse_args()
    out = console()
    print_header(out, "worker links: TLS against plaintext")
    results: dict[str, list[tuple[float, float]]] = {"TLS": [], "plaintext": []}
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp, \
            worker_server(Path(tmp) / "tls", token=TOKEN) as tls_address, \
            worker_server(Path(tmp) / "plain", token=TOKEN, plaintext=True) as plain_address:
        clients = {"TLS": WorkerClient(tls_address, TOKEN, OrchSettings()),
                   "plaintext": WorkerClient(plain_address, TOKEN, OrchSettings())}
        try:
            for _ in range(args.rounds):
                for name, client in clients.items():
                    rtt, bandwidth = client.measure_link(args.payload_mib << 20, 60)
                    results[name].append((rtt * 1e3, bandwidth / 1e6))
        finally:
            for client in clients.values():
                client.close()
    table = Table("link", "round trip (median)", f"{args.payload_mib} MiB payload (median)")
    for name, rows in results.items():
        table.add_row(name, f"{statistics.median(r for r, _ in rows):.2f} ms",
                      f"{statistics.median(b for _, b in rows):.0f} MB/s")
    out.print(table)


if __name__ == "__main__":
    main()
