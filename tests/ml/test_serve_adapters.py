"""Many adapters on one pipeline (ml.serve.adapters through ml.serve.inference.Engine), in-process on the tiny SDXL."""

from __future__ import annotations

import builtins
import io
import pickle
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from test_serve import FAST, write_random_lora

from ml.contract.container import LORA_WEIGHTS
from ml.serve import adapters, inference

SCALE_TOLERANCE = 3  # uint8 levels: fused weights and PEFT's unfused layers round differently


def _images(prediction) -> list[np.ndarray]:
    return [np.asarray(image.convert("RGB")).astype(np.int16) for image in prediction.images]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, base_model) -> Path:
    """default at the top, adapters/ink and adapters/paper, and a pickle-only adapter."""
    root = tmp_path_factory.mktemp("adapters")
    write_random_lora(base_model, root)
    for name, seed in (("ink", 1), ("paper", 2)):
        (root / "adapters" / name).mkdir(parents=True)
        write_random_lora(base_model, root / "adapters" / name, seed=seed)
    (root / "adapters" / "pickled").mkdir()
    (root / "adapters" / "pickled" / "pytorch_lora_weights.bin").write_bytes(pickle.dumps({"a": 1}))
    (root / "adapters" / "disguised").mkdir()
    (root / "adapters" / "disguised" / LORA_WEIGHTS).write_bytes(pickle.dumps({"a": 1}))
    return root


@pytest.fixture(scope="module")
def engine(model_dir, base_model):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BASE_MODEL", str(base_model))
        patch.setenv("SDXL_SERVE_ADAPTER_CACHE_SIZE", "2")
        return inference.model_fn(model_dir)


@pytest.fixture(scope="module")
def base_engine(base_model, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BASE_MODEL", str(base_model))
        return inference.model_fn(tmp_path_factory.mktemp("no-adapters"))


def render(engine, **fields) -> list[np.ndarray]:
    return _images(engine.generate(inference.parse_request({**FAST, **fields})))


def test_the_default_adapter_is_fused_and_warmed_up_before_the_first_request(engine):
    assert engine.default_adapter == "default" and engine.bank.fused == (("default", 1.0),)
    assert engine.warmup_seconds > 0
    assert engine.locator.names() == ["default", "disguised", "ink", "paper"]
    assert engine.pipeline.get_list_adapters() == {}  # no PEFT layer in the forward pass


def test_adapters_render_differently_and_scale_0_is_exactly_the_base_model(engine, base_engine):
    base = render(base_engine)[0]
    default, ink, paper = render(engine)[0], render(engine, adapter="ink")[0], render(engine, adapter="paper")[0]
    assert not np.array_equal(default, ink) and not np.array_equal(ink, paper) and not np.array_equal(default, base)
    for adapter in (None, "ink", {"ink": 1.0, "paper": 0.5}):
        assert np.array_equal(render(engine, adapter=adapter, lora_scale=0.0)[0], base)
    # Fusing again after any number of switches gives the same image: the originals are restored, never drift.
    assert np.array_equal(render(engine, adapter="ink")[0], ink)


@pytest.mark.parametrize("adapter, scale", [("ink", 1.0), ("ink", 0.6), ({"ink": 0.7, "paper": 0.5}, 1.0)])
def test_fused_equals_peft_unfused_within_tolerance(engine, model_dir, adapter, scale):
    """The reference is diffusers' own unfused path: PEFT layers and set_adapters."""
    from diffusers import StableDiffusionXLPipeline

    weights = {adapter: 1.0} if isinstance(adapter, str) else adapter
    reference = StableDiffusionXLPipeline.from_pretrained(engine.pipeline.name_or_path)
    reference.set_progress_bar_config(disable=True)
    for name in weights:
        reference.load_lora_weights(str(model_dir / "adapters" / name), weight_name=LORA_WEIGHTS, adapter_name=name)
    reference.set_adapters(list(weights), adapter_weights=[w * scale for w in weights.values()])
    import torch

    expected = np.asarray(reference(prompt=FAST["prompt"], width=32, height=32, num_inference_steps=2,
                                    generator=torch.Generator().manual_seed(FAST["seed"])).images[0]).astype(np.int16)
    fused = render(engine, adapter=adapter, lora_scale=scale)[0]
    assert np.abs(fused - expected).max() <= SCALE_TOLERANCE
    assert np.abs(fused - render(engine, adapter=adapter, lora_scale=scale * 0.5)[0]).max() > SCALE_TOLERANCE


def test_the_cache_evicts_the_least_recently_used_and_reloads_it_the_same(engine):
    first = render(engine, adapter="ink")[0]
    render(engine, adapter="paper")
    render(engine)  # default: the cache (size 2) drops ink, the least recently used
    assert list(engine.bank.cache) == ["paper", "default"] and engine.bank.evictions >= 1
    prediction = engine.generate(inference.parse_request({**FAST, "adapter": "ink"}))
    assert prediction.timings["adapter_load_seconds"] > 0  # loaded again
    assert np.array_equal(_images(prediction)[0], first)
    again = engine.generate(inference.parse_request({**FAST, "adapter": "ink"}))
    assert again.timings["adapter_load_seconds"] == 0 and again.timings["fuse_seconds"] == 0  # no switch
    with pytest.raises(inference.RequestError, match="cache holds 2"):
        render(engine, adapter={"ink": 1, "paper": 1, "default": 1})


@pytest.mark.parametrize("adapter, status, named", [
    ("nobody", 404, "unknown adapter 'nobody'; this endpoint has: default, disguised, ink, paper"),
    ("pickled", 400, "pickle file (pytorch_lora_weights.bin)"),
    ("disguised", 400, "not a safetensors file"),
    ("../ink", 400, "not a valid name"),
    ("s3://bucket/adapter.ckpt", 400, "pickle file"),
    ("s3://", 400, "names no bucket"),
])
def test_unknown_refused_and_invalid_adapters_get_a_4xx_naming_them(engine, adapter, status, named):
    with pytest.raises(inference.RequestError) as refused:
        render(engine, adapter=adapter)
    assert refused.value.status == status and named in str(refused.value)


def test_a_pickle_adapter_is_refused_without_being_opened(engine, model_dir, monkeypatch):
    opened = []
    real_open, real_io_open = builtins.open, io.open

    def recording(opener):
        def open_(file, *args, **kwargs):
            opened.append(str(file))
            return opener(file, *args, **kwargs)
        return open_

    monkeypatch.setattr(builtins, "open", recording(real_open))
    monkeypatch.setattr(io, "open", recording(real_io_open))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load was called"))
    with pytest.raises(inference.RequestError, match="pickle"):
        render(engine, adapter="pickled")
    assert not [path for path in opened if path.endswith(".bin")]


def test_prompt_length_checks_never_use_the_tokenizer_the_worker_encodes_with(engine, monkeypatch):
    """A request's length check runs in its caller's thread while the worker renders another request. A fast
    tokenizer keeps padding and truncation settings in its backend, so sharing one let a check (unpadded) hand
    the worker 28 ids where the second text encoder's had 77: 'Sizes of tensors must match' (seen once in the
    concurrent test below)."""
    users = []
    tokenizer_class = type(engine.pipeline.tokenizer)
    original = tokenizer_class.__call__

    def spy(self, *args, **kwargs):
        users.append(self is engine.pipeline.tokenizer)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tokenizer_class, "__call__", spy)
    engine.check_prompt_length(inference.parse_request({**FAST, "negative_prompt": "blurry"}))
    assert users == [False, False]  # prompt and negative prompt, each checked with the copy
    with pytest.raises(inference.RequestError, match="prompt is 78 tokens, longer than the 77"):
        engine.check_prompt_length(inference.parse_request({**FAST, "prompt": "x" * 76}))


def test_concurrent_requests_never_see_each_others_adapter_or_scale(engine):
    cases = [("ink", 1.0), ("paper", 1.0), ("ink", 0.0), ("paper", 0.5), ("ink", 1.0), ("paper", 0.5)]
    expected = {case: render(engine, adapter=case[0], lora_scale=case[1])[0] for case in set(cases)}
    with ThreadPoolExecutor(len(cases)) as pool:
        images = list(pool.map(lambda case: render(engine, adapter=case[0], lora_scale=case[1])[0], cases * 2))
    for case, image in zip(cases * 2, images):
        assert np.array_equal(image, expected[case]), case


def test_queued_requests_sharing_adapters_run_back_to_back_under_one_fusion(engine, monkeypatch):
    fused = []
    activate = engine.bank.activate
    monkeypatch.setattr(engine.bank, "activate", lambda combination, paths=None: (
        fused.append(combination), activate(combination, paths))[1])
    with engine._wakeup:  # the worker cannot take work until all four are queued
        futures = [engine.submit(inference.parse_request({**FAST, "adapter": name}))
                   for name in ("ink", "paper", "ink", "paper")]
    results = [future.result(timeout=60) for future in futures]
    assert [c[0][0] for c in fused] == ["ink", "ink", "paper", "paper"]
    assert [r.adapter for r in results] == ["ink", "paper", "ink", "paper"]


def test_a_failed_fusion_leaves_the_base_model_and_the_next_request_is_right(engine, base_engine, monkeypatch):
    ink = render(engine, adapter="ink")[0]
    render(engine, adapter="paper")
    layer = engine.bank.cache["paper"].layers[-1]
    monkeypatch.setattr(layer, "delta", lambda scale: (_ for _ in ()).throw(RuntimeError("device lost")))
    with pytest.raises(RuntimeError, match="device lost"):
        render(engine, adapter="paper", lora_scale=0.9)
    assert engine.bank.fused == ()
    assert np.array_equal(render(engine, adapter="ink")[0], ink)


def test_s3_adapters_load_from_a_safetensors_object_and_from_a_training_output(engine, model_dir, monkeypatch,
                                                                               tmp_path):
    import boto3
    from moto import mock_aws

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setattr(engine.locator, "s3_cache", tmp_path / "cache")
    ink = render(engine, adapter="ink")[0]
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(model_dir / "adapters" / "ink" / LORA_WEIGHTS, arcname=LORA_WEIGHTS)
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="loras")
        s3.upload_file(str(model_dir / "adapters" / "ink" / LORA_WEIGHTS), "loras", "ink/style.safetensors")
        s3.upload_file(str(archive), "loras", "jobs/ink/output/model.tar.gz")
        for uri in ("s3://loras/ink/style.safetensors", "s3://loras/jobs/ink/output/model.tar.gz"):
            assert np.array_equal(render(engine, adapter=uri)[0], ink), uri
        with pytest.raises(inference.RequestError) as missing:
            render(engine, adapter="s3://loras/nothing/")
        assert missing.value.status == 404 and "s3://loras/nothing/pytorch_lora_weights.safetensors" in str(
            missing.value)
        monkeypatch.setattr(engine.locator, "s3_prefix", "s3://loras/approved/")
        with pytest.raises(inference.RequestError) as outside:
            render(engine, adapter="s3://loras/ink/style.safetensors")
        assert outside.value.status == 403


def test_a_prompt_longer_than_the_text_encoders_read_and_a_size_over_budget_are_refused(engine, monkeypatch):
    with pytest.raises(inference.RequestError, match="prompt is 100 tokens, longer than the 77"):
        render(engine, prompt="a" * 98)  # the tiny tokenizer: a token per character, plus start and end
    monkeypatch.setattr(engine, "limits", inference.Limits(max_pixels=32 * 32))
    with pytest.raises(inference.RequestError, match="64 x 32 = 2048 pixels, over this endpoint's budget of 1024"):
        render(engine, width=64)
    with pytest.raises(inference.RequestError, match="64 x 64"):  # the model's default size counts
        render(engine, width=None, height=None)


def test_a_full_queue_answers_503(engine, monkeypatch):
    monkeypatch.setattr(engine, "limits", inference.Limits(max_queue=1))
    with engine._wakeup:
        first = engine.submit(inference.parse_request(FAST))
        with pytest.raises(inference.RequestError) as busy:
            engine.submit(inference.parse_request(FAST))
    assert busy.value.status == 503
    first.result(timeout=60)


def test_only_files_with_a_safetensors_header_pass(model_dir):
    adapters.check_safetensors_header(model_dir / LORA_WEIGHTS, "default")
    with pytest.raises(adapters.AdapterError, match="not a safetensors file"):
        adapters.check_safetensors_header(Path(__file__), "this file")
