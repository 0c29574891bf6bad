"""`sdxl-lora serve` on the tiny SDXL: request handling in-process, the HTTP contract as a real process."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from ml.serve import inference
from ml.serve import server as serve
from ml.serve.inference import RequestError, parse_request

FAST = {"prompt": "storyboard frame, a red circle", "width": 32, "height": 32, "num_inference_steps": 2, "seed": 7}
# Direct, so that a proxy in the environment never sees loopback requests.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# ---------------------------------------------------------------------------------------
# Helpers


def call(url: str, path: str, body: dict | bytes | None = None,
         headers: dict | None = None) -> tuple[int, dict]:
    """GET (no body) or POST url+path; the status and the decoded JSON answer, errors included."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json", **(headers or {})} if data is not None else {}
    request = urllib.request.Request(url + path, data=data, headers=headers)
    try:
        with OPENER.open(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def decode(encoded: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB"))


def render(url: str, **request) -> list[np.ndarray]:
    status, answer = call(url, "/invocations", {**FAST, **request})
    assert status == 200, answer
    return [decode(image) for image in answer["images"]]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """`python -m ml.cli serve` in a SageMaker-style directory, logging to a file."""

    def __init__(self, base_dir: Path, base_model: str):
        self.log = base_dir / "serve.log"
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {**os.environ, "SAGEMAKER_BASE_DIR": str(base_dir), "BASE_MODEL": base_model}
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ml.cli", "serve", "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1]],
                env=env, stdout=log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"server exited early:\n{self.output()}"
            try:
                if call(self.url, "/ping")[0] == 200:
                    return
            except OSError:  # not listening yet
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.output()}")

    def stop(self, timeout: float = 30) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:  # never leave a server behind
                self.process.kill()


def write_random_lora(base_model: Path, model_dir: Path, seed: int = 0) -> None:
    """A LoRA on the UNet and both text encoders with random (not no-op) weights, saved the way
    `sdxl-lora train` saves its LoRA: a training run this short would barely change an image."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from ml.contract.container import LORA_WEIGHTS
    from ml.train.models import TEXT_LORA_TARGETS, UNET_LORA_TARGETS

    pipeline = StableDiffusionXLPipeline.from_pretrained(base_model)
    torch.manual_seed(seed)
    layers = {}
    for name, targets in (("unet", UNET_LORA_TARGETS), ("text_encoder", TEXT_LORA_TARGETS),
                          ("text_encoder_2", TEXT_LORA_TARGETS)):
        config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=targets)
        model = getattr(pipeline, name)
        model.add_adapter(config)
        layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
        layers[f"{name}_lora_adapter_metadata"] = config.to_dict()
    StableDiffusionXLPipeline.save_lora_weights(model_dir, weight_name=LORA_WEIGHTS, safe_serialization=True, **layers)


# ---------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def lora_job_dir(tmp_path_factory, base_model) -> Path:
    base_dir = tmp_path_factory.mktemp("endpoint")
    (base_dir / "model").mkdir()
    write_random_lora(base_model, base_dir / "model")
    return base_dir


@pytest.fixture(scope="module")
def server_process(lora_job_dir, base_model):
    """One server with the LoRA for the module's HTTP tests."""
    process = ServerProcess(lora_job_dir, str(base_model))
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def server(server_process) -> str:
    return server_process.url


@pytest.fixture(scope="module")
def base_images(base_model, tmp_path_factory) -> list[np.ndarray]:
    """FAST rendered in-process by the base model alone (a model dir without a LoRA)."""
    with mock.patch.dict(os.environ, {"BASE_MODEL": str(base_model)}):
        model = inference.model_fn(tmp_path_factory.mktemp("no-lora"))
    prediction = inference.predict_fn(parse_request(FAST), model)
    answer = json.loads(inference.output_fn(prediction, "application/json"))
    assert answer["lora_scale"] is None
    return [decode(image) for image in answer["images"]]


@pytest.fixture
def local_server():
    """serve's HTTP layer on a free loopback port in this process, with a slot the test fills."""
    slot = serve.ModelSlot()
    httpd = serve.InferenceServer(("127.0.0.1", 0), slot)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield slot, f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


# ---------------------------------------------------------------------------------------
# Requests, without a model


def test_a_prompt_alone_takes_the_defaults_and_a_random_seed():
    request = parse_request({"prompt": "a cat", "width": None})
    assert (request.width, request.height, request.num_inference_steps, request.guidance_scale) == (None,) * 4
    assert (request.num_images_per_prompt, request.lora_scale, request.adapter) == (1, 1.0, None)
    assert 0 <= request.seed <= inference.MAX_SEED
    assert parse_request({"prompt": "a cat", "lora_scale": 1}).lora_scale == 1.0


@pytest.mark.parametrize("body, named", [
    ({}, "prompt"),
    ({"prompt": 3}, "prompt"),
    ({"prompt": "  "}, "prompt"),
    ({"prompt": "x", "negative_prompt": ["blur"]}, "negative_prompt"),
    ({"prompt": "x", "width": 30}, "width"),
    ({"prompt": "x", "width": 8192}, "width"),
    ({"prompt": "x", "width": 2048, "height": 2048}, "budget"),
    ({"prompt": "x" * 2001}, "prompt is 2001 characters"),
    ({"prompt": "x", "height": "64"}, "height"),
    ({"prompt": "x", "height": 0}, "height"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 151}, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 2.5}, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": True}, "num_inference_steps"),
    ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": "high"}, "guidance_scale"),
    ({"prompt": "x", "num_images_per_prompt": 5}, "num_images_per_prompt"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "lora_scale": 2.5}, "lora_scale"),
    ({"prompt": "x", "lora_scale": float("nan")}, "lora_scale"),
    ({"prompt": "x", "lora_scale": -0.1}, "lora_scale"),
    ({"prompt": "x", "adapter": ""}, "adapter"),
    ({"prompt": "x", "adapter": 3}, "adapter"),
    ({"prompt": "x", "adapter": {}}, "adapter"),
    ({"prompt": "x", "adapter": {"a": 1, "b": 1, "c": 1, "d": 1, "e": 1}}, "adapter"),
    ({"prompt": "x", "adapter": {"a": 2.5}}, "adapter weight of a"),
    ({"prompt": "x", "steps": 3, "cfg": 1}, "unknown field(s): cfg, steps"),
])
def test_invalid_requests_are_refused_naming_the_field(body, named):
    with pytest.raises(RequestError) as refused:
        parse_request(body)
    assert named in str(refused.value)
    assert refused.value.status == 400


@pytest.mark.parametrize("data, content_type, status, named", [
    (b"{not json", "application/json", 400, "not valid JSON"),
    (b"\xff\xfe", "application/json", 400, "not valid JSON"),
    (b'["a cat"]', "application/json", 400, "JSON object"),
    (b'{"prompt": "a cat"}', "text/plain", 415, "text/plain"),
])
def test_input_fn_refuses_bodies_it_cannot_read(data, content_type, status, named):
    with pytest.raises(RequestError) as refused:
        inference.input_fn(data, content_type)
    assert refused.value.status == status and named in str(refused.value)


def test_input_fn_reads_json_with_a_charset():
    assert inference.input_fn(b'{"prompt": "a cat"}', "application/json; charset=utf-8").prompt == "a cat"


def test_output_fn_answers_json_png_or_jpeg_as_the_client_accepts():
    prediction = inference.Prediction(images=[Image.new("RGB", (8, 8), (200, 10, 10))], seed=1, adapter="ink",
                                      lora_scale=0.5, inference_seconds=0.25)
    for accept in (None, "", "*/*", "application/json", "image/png;q=0.5, application/json;q=0.9"):
        answer = json.loads(inference.output_fn(prediction, accept))
        assert answer["seed"] == 1 and answer["lora_scale"] == 0.5 and answer["adapter"] == "ink"
        assert answer["image_format"] == "png" and decode(answer["images"][0]).shape == (8, 8, 3)
    for accept, kind in (("image/png", "PNG"), ("image/jpeg", "JPEG"), ("image/jpeg, application/json;q=0.5", "JPEG"),
                         ("image/*", "PNG")):
        image = Image.open(io.BytesIO(inference.output_fn(prediction, accept)))
        assert image.format == kind and image.size == (8, 8)
    assert inference.custom_attributes(prediction) == "seed=1,adapter=ink,lora_scale=0.5,inference_seconds=0.25"
    with pytest.raises(RequestError) as refused:
        inference.output_fn(prediction, "text/html")
    assert refused.value.status == 406 and "text/html" in str(refused.value)


# ---------------------------------------------------------------------------------------
# The HTTP layer in-process, with the model slot under the test's control


def test_ping_is_503_while_loading_or_failed_and_200_when_ready(local_server):
    slot, url = local_server
    assert call(url, "/ping") == (503, {"status": "loading"})
    assert call(url, "/invocations", FAST)[0] == 503
    slot.error = "model could not be loaded: BASE_MODEL /nowhere does not exist"
    assert call(url, "/ping") == (503, {"status": "failed", "error": slot.error})
    slot.model = object()  # anything loaded
    assert call(url, "/ping") == (200, {"status": "ready"})
    assert call(url, "/elsewhere")[0] == 404


def test_a_failure_while_predicting_is_a_500_and_the_next_request_is_served(local_server, tmp_path, monkeypatch,
                                                                           base_model):
    slot, url = local_server
    monkeypatch.setenv("BASE_MODEL", str(base_model))
    slot.model = inference.model_fn(tmp_path)
    expected = render(url)[0]
    unet = slot.model.pipeline.unet
    forward = unet.forward
    monkeypatch.setattr(unet, "forward", mock.Mock(side_effect=RuntimeError("out of memory")))
    status, answer = call(url, "/invocations", FAST)
    assert status == 500 and "RuntimeError: out of memory" in answer["error"]
    monkeypatch.setattr(unet, "forward", forward)
    assert call(url, "/ping")[0] == 200
    assert np.array_equal(render(url)[0], expected)


# ---------------------------------------------------------------------------------------
# Loading models in-process


def test_model_fn_names_a_base_model_it_cannot_load(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    cases = {str(tmp_path / "missing"): "does not exist",
             str(tmp_path / "empty"): "no model_index.json",
             "no-such-org/no-such-model": "could not be loaded as an SDXL pipeline"}  # the Hub is offline in tests
    for base, problem in cases.items():
        monkeypatch.setenv("BASE_MODEL", base)
        with pytest.raises(inference.ModelLoadError) as failed:
            inference.model_fn(tmp_path)
        assert base in str(failed.value) and problem in str(failed.value)


def test_model_fn_names_a_lora_file_it_cannot_load(tmp_path, monkeypatch, base_model):
    monkeypatch.setenv("BASE_MODEL", str(base_model))
    (tmp_path / inference.LORA_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(inference.ModelLoadError, match=inference.LORA_WEIGHTS):
        inference.model_fn(tmp_path)


def test_a_model_dir_without_a_lora_serves_the_base_model(tmp_path, monkeypatch, base_model, caplog):
    monkeypatch.setenv("BASE_MODEL", str(base_model))
    with caplog.at_level("WARNING", logger="ml.serve.inference"):
        model = inference.model_fn(tmp_path)
    assert model.default_adapter is None and model.bank.fused == ()
    assert "get the base model" in caplog.text


def test_base_model_from_s3_is_downloaded_once_and_loaded(tmp_path, monkeypatch, base_model):
    import boto3
    from moto import mock_aws

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "BASE_MODEL_CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="models")
        for path in base_model.rglob("*"):
            if path.is_file():
                s3.upload_file(str(path), "models", f"base/tiny-sdxl/{path.relative_to(base_model).as_posix()}")
        monkeypatch.setenv("BASE_MODEL", "s3://models/base/tiny-sdxl")
        model = inference.model_fn(tmp_path / "no-lora")
        assert (tmp_path / "cache" / "models" / "base" / "tiny-sdxl" / "model_index.json").is_file()
        assert model.pipeline.unet.config.cross_attention_dim == 64

        cached = {path: path.stat().st_mtime_ns for path in (tmp_path / "cache").rglob("*") if path.is_file()}
        inference.download_s3_prefix("s3://models/base/tiny-sdxl", tmp_path / "cache")
        assert {path: path.stat().st_mtime_ns for path in cached} == cached  # nothing downloaded again

        monkeypatch.setenv("BASE_MODEL", "s3://models/base/nothing-here")
        with pytest.raises(inference.ModelLoadError, match="s3://models/base/nothing-here has no objects"):
            inference.model_fn(tmp_path / "no-lora")


def test_the_lora_written_by_the_training_job_is_served(make_job, monkeypatch, base_model):
    job = make_job({"train_text_encoder": True, "max_train_steps": 2}).run()
    assert job.returncode == 0, job.stdout
    monkeypatch.setenv("BASE_MODEL", str(base_model))
    model = inference.model_fn(job.model)
    layers = model.bank.cache["default"].layers
    owners = {name for name in ("unet", "text_encoder", "text_encoder_2")
              for layer in layers if any(m is layer.module for m in getattr(model.pipeline, name).modules())}
    assert owners == {"unet", "text_encoder", "text_encoder_2"}
    assert model.pipeline.get_list_adapters() == {}  # fused: no PEFT layer stays in the forward pass
    prediction = inference.predict_fn(parse_request({**FAST, "lora_scale": 0.5}), model)
    assert len(prediction.images) == 1 and prediction.images[0].size == (32, 32) and prediction.lora_scale == 0.5


# ---------------------------------------------------------------------------------------
# `sdxl-lora serve` as a process


def test_invocations_answer_pngs_of_the_requested_size_and_count(server):
    status, answer = call(server, "/invocations", {**FAST, "width": 48, "height": 32, "num_images_per_prompt": 2,
                                                   "lora_scale": 0.5, "negative_prompt": "blurry",
                                                   "guidance_scale": 3.0})
    assert status == 200, answer
    assert [decode(image).shape for image in answer["images"]] == [(32, 48, 3)] * 2
    assert answer["seed"] == FAST["seed"] and answer["lora_scale"] == 0.5 and answer["inference_seconds"] > 0


def test_the_same_seed_gives_the_same_image_and_another_seed_another(server):
    first, again, other = render(server), render(server), render(server, seed=8)
    assert np.array_equal(first[0], again[0])
    assert not np.array_equal(first[0], other[0])


def test_a_request_without_a_seed_is_told_the_seed_that_reproduces_it(server):
    request = {key: value for key, value in FAST.items() if key != "seed"}
    status, answer = call(server, "/invocations", request)
    assert status == 200
    assert np.array_equal(decode(answer["images"][0]), render(server, seed=answer["seed"])[0])


def test_lora_scale_0_is_the_base_model_and_no_scale_leaks_into_the_next_request(server, base_images):
    full, off, full_again = render(server, lora_scale=1.0), render(server, lora_scale=0.0), render(server)
    assert np.array_equal(off[0], base_images[0])
    assert not np.array_equal(full[0], base_images[0])
    assert np.array_equal(full[0], full_again[0])


def test_concurrent_requests_each_get_their_own_lora_scale(server, base_images):
    full = render(server, lora_scale=1.0)[0]
    scales = [0.0, 1.0, 0.0, 1.0]
    with ThreadPoolExecutor(len(scales)) as pool:
        images = list(pool.map(lambda scale: render(server, lora_scale=scale)[0], scales))
    for scale, image in zip(scales, images):
        assert np.array_equal(image, base_images[0] if scale == 0.0 else full)


@pytest.mark.parametrize("body, headers, status, named", [
    ({**FAST, "width": 30}, {}, 400, "width"),
    ({**FAST, "colour": "red"}, {}, 400, "colour"),
    ({"width": 32}, {}, 400, "prompt"),
    (b"{not json", {}, 400, "JSON"),
    (FAST, {"Content-Type": "text/csv"}, 415, "text/csv"),
    (FAST, {"Accept": "text/html"}, 406, "text/html"),
])
def test_bad_requests_get_a_4xx_naming_the_problem(server, body, headers, status, named):
    answer_status, answer = call(server, "/invocations", body, headers)
    assert answer_status == status and named in answer["error"]


def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(tmp_path, base_model):
    import psutil

    (tmp_path / "model").mkdir()  # no LoRA: the base model is served
    process = ServerProcess(tmp_path, str(base_model))
    try:
        process.wait_ready()
        body = json.dumps(FAST).encode()
        # Half a request keeps it in flight (its handler waits for the rest) until the test says.
        connection = http.client.HTTPConnection(process.url.removeprefix("http://"), timeout=60)
        connection.putrequest("POST", "/invocations")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body[:10])
        # SIGTERM only once the server has accepted the connection (its socket ESTABLISHED in the server: counted
        # in flight from then on), whatever the machine's speed: not after a pause that assumes it had.
        port = int(process.url.rsplit(":", 1)[1])
        deadline = time.monotonic() + 120
        while not any(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
                      for c in psutil.Process(process.process.pid).net_connections(kind="tcp")):
            assert time.monotonic() < deadline, "the server never accepted the connection"
            time.sleep(0.05)
        process.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while "SIGTERM received" not in process.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        connection.send(body[10:])
        response = connection.getresponse()
        answer = json.loads(response.read())
        assert process.process.wait(30) == 0, process.output()
    finally:
        process.process.kill()
    assert response.status == 200 and len(answer["images"]) == 1 and answer["lora_scale"] is None
    assert "POST /invocations 200" in process.output().split("SIGTERM received")[1]


# ---------------------------------------------------------------------------------------
# Bad requests through HTTP, and many random ones


@pytest.mark.parametrize("body, status, named", [
    ({**FAST, "prompt": ""}, 400, "prompt must not be empty"),
    ({**FAST, "prompt": "x" * 100}, 400, "prompt is 102 tokens"),
    ({**FAST, "height": 36}, 400, "height must be a multiple of 8"),
    ({**FAST, "width": 4096, "height": 4096}, 400, "budget"),
    ({**FAST, "num_inference_steps": 500}, 400, "num_inference_steps"),
    ({**FAST, "guidance_scale": 51}, 400, "guidance_scale"),
    ({**FAST, "num_images_per_prompt": 20}, 400, "num_images_per_prompt"),
    ({**FAST, "lora_scale": 3}, 400, "lora_scale"),
    ({**FAST, "adapter": "nobody"}, 404, "unknown adapter 'nobody'"),
    ({**FAST, "num_images_per_prompt": 2}, 406, "one image"),  # with Accept: image/jpeg
])
def test_each_kind_of_bad_request_gets_its_4xx(server, body, status, named):
    headers = {"Accept": "image/jpeg"} if status == 406 else {}
    answer_status, answer = call(server, "/invocations", body, headers)
    assert (answer_status, named in answer["error"]) == (status, True), answer


def raw_post(url: str, body: bytes, headers: dict, send: bytes | None = None) -> tuple[int, dict]:
    """POST with exactly these headers; send (default: body) is what really goes over the wire."""
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    try:
        connection.putrequest("POST", "/invocations", skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        connection.send(body if send is None else send)
        if send is not None:
            connection.sock.shutdown(socket.SHUT_WR)  # the client is done, whatever it declared
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_a_jpeg_answer_carries_seed_and_timings_in_custom_attributes(server):
    request = urllib.request.Request(server + "/invocations", data=json.dumps(FAST).encode(),
                                     headers={"Content-Type": "application/json", "Accept": "image/jpeg"})
    with OPENER.open(request, timeout=120) as response:
        assert response.headers["Content-Type"] == "image/jpeg"
        attributes = dict(pair.split("=", 1) for pair in response.headers["X-Amzn-SageMaker-Custom-Attributes"].split(","))
        image = Image.open(io.BytesIO(response.read()))
    assert image.format == "JPEG" and image.size == (32, 32)
    assert attributes["seed"] == "7" and attributes["adapter"] == "default" and float(attributes["inference_seconds"]) > 0


def test_the_body_size_limit_and_content_length_are_enforced(server):
    body = json.dumps(FAST).encode()
    status, answer = raw_post(server, b"", {"Content-Type": "application/json", "Content-Length": str(10 << 20)},
                              send=b"")
    assert status == 413 and "larger than the 1048576 allowed" in answer["error"]
    status, answer = raw_post(server, body, {"Content-Type": "application/json"})
    assert status == 411
    status, answer = raw_post(server, body, {"Content-Type": "application/json", "Content-Length": str(len(body) + 50)},
                              send=body)
    assert status == 400 and f"ended after {len(body)} of {len(body) + 50} bytes" in answer["error"]


JUNK_NUMBERS = ["", [], {}, True, -7, 10**30, "9", float("inf")]
JUNK_TEXT = [[], {}, True, -7, 10**30, "x" * 3000]
JUNK_ADAPTERS = ["", [], {}, True, -7, "no-such-adapter", {"default": -1}, "s3://", "../../etc", "x.ckpt"]


def pick(rng: np.random.Generator, choices: list):
    return choices[int(rng.integers(0, len(choices)))]


def malformed_request(rng: np.random.Generator) -> tuple[bytes, dict]:
    """One random request the server must refuse: its body and headers."""
    headers = {"Content-Type": "application/json"}
    kind = rng.integers(0, 7)
    if kind == 0:  # bytes
        body = rng.bytes(int(rng.integers(0, 300)))
    elif kind == 1:  # JSON that is not an object
        body = json.dumps(pick(rng, [[1, 2], "prompt", 3.5, None, True, [{"prompt": "x"}]])).encode()
    elif kind == 2:  # deeply nested
        depth = int(rng.integers(1000, 100_000))
        body = b"[" * depth + b"]" * depth
    elif kind == 3:  # a valid request with junk in 1 to 3 fields, or an unknown field
        request = dict(FAST)
        for _ in range(int(rng.integers(1, 4))):
            name = pick(rng, list(FAST) + ["adapter", "lora_scale", "bogus"])
            request[name] = pick(rng, JUNK_TEXT if name == "prompt" else JUNK_ADAPTERS if name == "adapter"
                                 else JUNK_NUMBERS)
        body = json.dumps(request).encode()
    elif kind == 4:  # a content type it does not read
        body = json.dumps(FAST).encode()
        headers["Content-Type"] = pick(rng, ["text/plain", "application/x-www-form-urlencoded", "image/png"])
    elif kind == 5:  # truncated JSON
        text = json.dumps({**FAST, "prompt": "a red circle"}).encode()
        body = text[:int(rng.integers(1, len(text) - 1))]
    else:  # an Accept it cannot answer
        body = json.dumps(FAST).encode()
        headers["Accept"] = pick(rng, ["text/html", "application/xml", "video/mp4"])
    headers["Content-Length"] = str(len(body))
    return body, headers


def test_hundreds_of_random_malformed_requests_leave_the_server_serving_in_bounded_memory(server_process):
    import psutil

    url = server_process.url
    before_image = render(url)[0]
    server = psutil.Process(server_process.process.pid)
    rss_before = server.memory_info().rss
    rng = np.random.default_rng(11)
    statuses = Counter()
    for _ in range(250):
        body, headers = malformed_request(rng)
        status, answer = raw_post(url, body, headers)
        assert 400 <= status < 500 and answer["error"], (status, answer, body[:200], headers)
        statuses[status] += 1
    assert server_process.process.poll() is None
    assert call(url, "/ping")[0] == 200
    assert np.array_equal(render(url)[0], before_image)
    assert server.memory_info().rss - rss_before < 64 << 20, statuses
    assert {400, 406, 415} <= set(statuses)
