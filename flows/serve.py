"""`llmcycle serve`: MLflow's scoring server behind a small guard that caps what one request may ask for.

MLflow's scoring server (uvicorn) runs the model; it accepts any request size and any `max_new_tokens`, so
one request can hold a CPU for hours, and it answers a malformed request with a 500 and a stack trace. The
guard in front of it listens on the public address and, before a request reaches the model:

- refuses a body over `max_request_bytes` (413), JSON that does not parse or has the wrong shape (400),
  more than `max_batch` inputs (413) and `max_new_tokens` above `max_new_tokens` (422), each with a
  one-line `{"error": ...}`;
- lets at most `concurrency` requests generate at once (the others wait), so memory stays flat under load;
- passes errors from the model on without their stack traces.

The scoring server listens on loopback only, is a child of the guard in a process group of its own, and
dies with it: on SIGTERM/SIGINT the guard stops it, and if the guard is killed outright Linux stops it
(PR_SET_PDEATHSIG). Written with the standard library's HTTP server: the guard's job is a few checks and a
forward, and no proxy library is a dependency of llmcycle already.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

INPUT_KEYS = ("inputs", "instances")  # MLflow's names for a list of prompts
DRAIN_BYTES = 16 << 20  # an oversized body up to this is read and dropped before the 413; a larger one is not


@dataclass
class Limits:
    """What one request may ask for (documented in the README's "Serving" section)."""

    max_request_bytes: int = 64 * 1024
    max_batch: int = 16
    max_new_tokens: int = 256
    concurrency: int = 2
    timeout_s: float = 120.0


class Refused(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_request(body: bytes, limits: Limits) -> bytes:
    """The body to forward (with `max_new_tokens` filled in when absent), or Refused with what is wrong."""
    if len(body) > limits.max_request_bytes:
        raise Refused(413, f"the request is {len(body):,} bytes; this server takes at most "
                           f"{limits.max_request_bytes:,} (--max-request-bytes)")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise Refused(400, f"the body is not valid JSON ({err})") from None
    if not isinstance(data, dict) or not any(k in data for k in INPUT_KEYS):
        raise Refused(400, 'expected a JSON object {"inputs": ["prompt", ...], "params": {"max_new_tokens": N}}')
    key = next(k for k in INPUT_KEYS if k in data)
    inputs = data[key] if isinstance(data[key], list) else [data[key]]
    if not inputs or not all(isinstance(x, str) for x in inputs):
        raise Refused(400, f"'{key}' must be a prompt or a non-empty list of prompts (strings)")
    if len(inputs) > limits.max_batch:
        raise Refused(413, f"{len(inputs)} prompts in one request; this server takes at most {limits.max_batch} "
                           "(--max-batch)")
    params = data.get("params") or {}
    if not isinstance(params, dict):
        raise Refused(400, "'params' must be an object")
    wanted = params.get("max_new_tokens", limits.max_new_tokens)
    if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < 1:
        raise Refused(400, f"params.max_new_tokens must be a positive integer, got {json.dumps(wanted)}")
    if wanted > limits.max_new_tokens:
        raise Refused(422, f"params.max_new_tokens is {wanted:,}; this server generates at most "
                           f"{limits.max_new_tokens} (--max-new-tokens)")
    return json.dumps({**data, "params": {**params, "max_new_tokens": wanted}}).encode()


def _clean_error(status: int, body: bytes) -> bytes:
    """MLflow's error body without its stack trace."""
    try:
        data = json.loads(body)
        message = data.get("message") or data.get("error") or "the model failed on this request"
    except (ValueError, AttributeError):
        message = body.decode(errors="replace")[:500] or f"the model server answered {status}"
    return json.dumps({"error": str(message).splitlines()[0][:1000]}).encode()


def make_handler(upstream: tuple[str, int], limits: Limits):
    slots = threading.BoundedSemaphore(limits.concurrency)

    class Guard(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "llmcycle-serve"

        def log_message(self, fmt, *args):  # one line per request, to stdout
            print(f"{self.address_string()} {fmt % args}", flush=True)

        def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _refuse(self, status: int, message: str) -> None:
            self._send(status, json.dumps({"error": message}).encode())

        def _forward(self, method: str, body: bytes | None = None) -> None:
            conn = http.client.HTTPConnection(*upstream, timeout=limits.timeout_s)
            try:
                conn.request(method, self.path, body=body, headers={"Content-Type": "application/json"})
                answer = conn.getresponse()
                data = answer.read()
            except TimeoutError:
                return self._refuse(504, f"the model did not answer within {limits.timeout_s:.0f} s")
            except OSError as err:
                return self._refuse(502, f"the model server is not answering ({err})")
            finally:
                conn.close()
            self._send(answer.status, data if answer.status < 400 else _clean_error(answer.status, data),
                       answer.getheader("Content-Type", "application/json"))

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path in ("/ping", "/health", "/version"):
                return self._forward("GET")
            self._refuse(404, f"no {self.path} here; POST /invocations, GET /ping")

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/invocations":
                return self._refuse(404, f"no {self.path} here; POST /invocations, GET /ping")
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self._refuse(411, "a Content-Length header is required")
            if length > limits.max_request_bytes:  # refused without keeping it
                remaining = length if length <= DRAIN_BYTES else 0  # read and drop it: the client hears the 413
                while remaining > 0 and (chunk := self.rfile.read(min(1 << 16, remaining))):
                    remaining -= len(chunk)
                self.close_connection = True
                return self._refuse(413, f"the request is {length:,} bytes; this server takes at most "
                                         f"{limits.max_request_bytes:,} (--max-request-bytes)")
            try:
                body = check_request(self.rfile.read(length), limits)
            except Refused as err:
                return self._refuse(err.status, str(err))
            with slots:
                self._forward("POST", body)

    return Guard


def _child_setup() -> None:
    os.setsid()  # its own group: stopping it stops whatever it starts
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the guard
    except (OSError, AttributeError):
        pass


def start_scoring_server(model_folder: Path, port: int, env: dict[str, str]) -> subprocess.Popen:
    """MLflow's scoring server for a downloaded model, on loopback, as a direct child (not via `mlflow models
    serve`, whose uvicorn outlives it)."""
    from mlflow.pyfunc.scoring_server import get_cmd

    _, server_env = get_cmd(str(model_folder), port=port, host="127.0.0.1", nworkers=1)
    command = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "flows.scoring_app:app"]
    return subprocess.Popen(command, env={**server_env, **env}, preexec_fn=_child_setup)


def wait_ready(upstream: tuple[str, int], child: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise RuntimeError(f"the scoring server exited with status {child.returncode} while loading the model")
        try:
            conn = http.client.HTTPConnection(*upstream, timeout=2)
            conn.request("GET", "/ping")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the scoring server did not answer within {seconds:.0f} s")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model_folder: Path, host: str, port: int, limits: Limits, env: dict[str, str]) -> int:
    """Serve until SIGTERM/SIGINT, then stop the scoring server too. Returns the exit status."""
    upstream = ("127.0.0.1", free_port())
    child = start_scoring_server(model_folder, upstream[1], env)
    server = None
    try:
        wait_ready(upstream, child)
        server = ThreadingHTTPServer((host, port), make_handler(upstream, limits))
        server.daemon_threads = True
        stop = lambda signum, frame: threading.Thread(target=server.shutdown, daemon=True).start()  # noqa: E731
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        print(f"ready: http://{host}:{port}/invocations (scoring server pid {child.pid}; at most "
              f"{limits.max_request_bytes:,} bytes, {limits.max_batch} prompts and {limits.max_new_tokens} new "
              f"tokens per request, {limits.concurrency} at once)", flush=True)
        server.serve_forever()
        return 0
    finally:
        if server is not None:
            server.server_close()
        _stop(child)


def _stop(child: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
