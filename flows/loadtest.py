"""A bounded load test of a served model: N clients posting prompts for T seconds, on loopback only.

Used by `benchmarks/bench_serve.py` (the README's figures) and by the serving test. Each client sends its
next request as soon as the previous one is answered; latency is measured per request, end to end.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import urlparse

PROMPTS = ("The ", "def ", "A class ", "In Python, ", "for i in ", "import ")


@dataclass
class LoadReport:
    clients: int
    seconds: float
    answered: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies_ms) if self.latencies_ms else float("nan")

    @property
    def p99_ms(self) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else float("nan")

    @property
    def per_second(self) -> float:
        return self.answered / self.seconds

    def __str__(self) -> str:
        return (f"{self.clients} clients x {self.seconds:.0f} s: {self.answered} answered, {self.errors} errors, "
                f"p50 {self.p50_ms:.0f} ms, p99 {self.p99_ms:.0f} ms, {self.per_second:.1f} requests/s")


def load_test(url: str, clients: int = 8, seconds: float = 10, max_new_tokens: int = 8,
              max_requests: int = 10_000) -> LoadReport:
    """Run the load; at most `max_requests` in all, and requests still in flight at the end are waited for."""
    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"the load test runs against loopback only, not {host}")
    report, lock = LoadReport(clients, seconds), threading.Lock()
    deadline, sent = time.monotonic() + seconds, [0]

    def client(k: int) -> None:
        i = 0
        while time.monotonic() < deadline:
            with lock:
                if sent[0] >= max_requests:
                    return
                sent[0] += 1
            body = json.dumps({"inputs": [PROMPTS[(k + i) % len(PROMPTS)]],
                               "params": {"max_new_tokens": max_new_tokens}}).encode()
            request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            start = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=120) as answer:
                    ok = answer.status == 200 and json.loads(answer.read()).get("predictions")
            except (urllib.error.URLError, OSError, ValueError):
                ok = False
            with lock:
                report.latencies_ms.append((time.perf_counter() - start) * 1000)
                report.answered += bool(ok)
                report.errors += not ok
            i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return report
