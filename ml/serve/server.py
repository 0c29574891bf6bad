"""`sdxl-lora serve`: the inference container's HTTP server, under SageMaker's hosting contract.

- GET /ping: 200 once the model is loaded; 503 while it loads, or with the reason when loading failed.
- POST /invocations: one JSON request through ml.serve.inference's input_fn, predict_fn and output_fn.
  A bad request gets its 4xx status and {"error": ...} naming the problem (checked before the
  request queues for the pipeline); a failure while predicting gets 500 and the server carries on.
  The answer is JSON, or a PNG/JPEG per Accept (seed and timings then in
  X-Amzn-SageMaker-Custom-Attributes).
- Port $SAGEMAKER_BIND_TO_PORT or 8080 on 0.0.0.0 unless told otherwise; the LoRA is read from
  /opt/ml/model (under $SAGEMAKER_BASE_DIR when set), the base model from $BASE_MODEL.
- SIGTERM (or SIGINT): stop accepting connections, let in-flight requests finish, exit 0.

The model loads and warms up on a background thread, so the port answers /ping (503) from the start
and 200 only once a first generation has run.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from ml.contract.container import ContainerPaths, configure_logging
from ml.serve import inference

log = logging.getLogger(__name__)

DEFAULT_PORT = 8080
DRAIN_SECONDS = 60  # how long SIGTERM waits for in-flight requests before exiting anyway


class ModelSlot:
    """The model once loaded, or why it could not be."""

    def __init__(self) -> None:
        self.model: inference.Engine | None = None
        self.error: str | None = None

    def load(self, model_dir: Path) -> None:
        try:
            self.model = inference.model_fn(str(model_dir))
        except Exception as error:  # reported by /ping; the server stays up to say so
            self.error = f"model could not be loaded: {error}"
            log.error("%s", self.error)
            # A ModelLoadError says what is wrong; a traceback helps with anything it wraps or missed.
            if error.__cause__ is not None or not isinstance(error, inference.ModelLoadError):
                log.exception("traceback")

    def state(self) -> dict:
        if self.model is not None:
            return {"status": "ready"}
        if self.error is not None:
            return {"status": "failed", "error": self.error}
        return {"status": "loading"}


class Handler(BaseHTTPRequestHandler):
    server: "InferenceServer"
    timeout = 30  # seconds a client may take to send its request: a stalled one never holds a thread for long

    def handle_one_request(self) -> None:
        self.started = time.monotonic()
        super().handle_one_request()

    def do_GET(self) -> None:
        if urlsplit(self.path).path != "/ping":
            return self._send_json(404, {"error": f"no such path: {self.path}"})
        state = self.server.slot.state()
        self._send_json(200 if state["status"] == "ready" else 503, state)

    def do_POST(self) -> None:
        if urlsplit(self.path).path != "/invocations":
            return self._send_json(404, {"error": f"no such path: {self.path}"})
        slot = self.server.slot
        if slot.model is None:
            return self._send_json(503, slot.state())
        extra = {}
        try:
            media = inference.negotiate(self.headers.get("Accept"))
            data = inference.input_fn(self._read_body(slot.model.limits), self.headers.get("Content-Type"))
            inference.check_media(media, data)
            prediction = inference.predict_fn(data, slot.model)
            body = inference.output_fn(prediction, media)
            if media != inference.JSON:
                extra["X-Amzn-SageMaker-Custom-Attributes"] = inference.custom_attributes(prediction)
        except inference.RequestError as error:
            return self._send_json(error.status, {"error": str(error)})
        except Exception as error:
            log.exception("invocation failed")
            return self._send_json(500, {"error": f"inference failed: {type(error).__name__}: {error}"})
        self._send(200, body.encode() if isinstance(body, str) else body, media, extra)

    def _read_body(self, limits: inference.Limits) -> bytes:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            raise inference.RequestError("chunked request bodies are not supported; send a Content-Length",
                                         status=411)
        if length is None or not length.strip().isdigit():
            raise inference.RequestError("a Content-Length header is required", status=411)
        if int(length) > limits.max_body_bytes:
            raise inference.RequestError(f"request body is {int(length)} bytes, larger than the "
                                         f"{limits.max_body_bytes} allowed", status=413)
        try:
            body = self.rfile.read(int(length))
        except TimeoutError:
            raise inference.RequestError(f"request body did not arrive within {self.timeout} s", status=408) from None
        if len(body) < int(length):
            raise inference.RequestError(f"request body ended after {len(body)} of {int(length)} bytes")
        return body

    def _send_json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code="-", size="-") -> None:
        if isinstance(code, HTTPStatus):
            code = code.value
        # SageMaker pings every few seconds: healthy pings would bury the requests that matter.
        level = logging.DEBUG if (self.command, code) == ("GET", 200) else logging.INFO
        log.log(level, "%s %s %s %.3fs", self.command, self.path, code, time.monotonic() - self.started)

    def log_message(self, format: str, *args) -> None:
        log.warning("%s: %s", self.address_string(), format % args)


class InferenceServer(ThreadingHTTPServer):
    """One thread per connection (/ping stays responsive while a request renders), counting
    the requests in flight so that a stop can wait for them."""

    def __init__(self, address: tuple[str, int], slot: ModelSlot) -> None:
        super().__init__(address, Handler)
        self.slot = slot
        self._in_flight = 0
        self._idle = threading.Condition()

    def process_request(self, request, client_address) -> None:
        with self._idle:  # counted before the thread starts, so a stop never misses it
            self._in_flight += 1
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)


def _stop_on_signals(server: InferenceServer) -> None:
    def stop(signum, frame) -> None:
        log.info("%s received: finishing in-flight requests, then exiting", signal.Signals(signum).name)
        # shutdown() waits for serve_forever() to return, and serve_forever() runs on this thread.
        threading.Thread(target=server.shutdown, name="shutdown").start()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)


def main(host: str = "0.0.0.0", port: int | None = None) -> int:
    """Entrypoint of `sdxl-lora serve`; returns the exit status once stopped."""
    configure_logging()
    if port is None:
        port = int(os.environ.get("SAGEMAKER_BIND_TO_PORT") or DEFAULT_PORT)
    model_dir = ContainerPaths.from_env().model
    slot = ModelSlot()
    try:
        server = InferenceServer((host, port), slot)
    except OSError as error:
        log.error("cannot listen on %s:%d: %s", host, port, error)
        return 1
    threading.Thread(target=slot.load, args=(model_dir,), name="model-loader", daemon=True).start()
    _stop_on_signals(server)
    log.info("listening on http://%s:%d, loading the model (LoRA from %s)", host, server.server_port, model_dir)
    server.serve_forever()
    if not server.wait_idle(DRAIN_SECONDS):
        log.warning("requests still running after %d s: exiting anyway", DRAIN_SECONDS)
    server.server_close()
    log.info("stopped")
    return 0


