import dataclasses
import hashlib

import pytest
import torch
from PIL import Image
from transformers import (
    BertTokenizer,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    LlamaForCausalLM,
    LlamaTokenizer,
)

from ml import cli
from ml.contract.container import JobError
from ml.fixtures import tiny_captioner
from ml.prepare.captioning import DEFAULT_MODEL, Captioner, CaptionSettings

# Deterministic, one caption per image alone: what an image gets cannot depend on its position or batch.
GREEDY = CaptionSettings(do_sample=False, num_beams=1, min_length=10, max_length=20, batch_size=1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A model this small runs fastest on one thread; on a shared, busy CPU, more threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _frames(count, size=(160, 90)):
    """Distinct RGB frames of a size other than the model's, so the processor must resize them."""
    frames = []
    for index in range(count):
        image = Image.new("RGB", size, ((index * 53) % 256, (index * 101) % 256, (index * 29 + 80) % 256))
        image.paste((255 - (index * 53) % 256, 40, 200), (index * 7 % 100, 10, index * 7 % 100 + 50, 70))
        frames.append(image)
    return frames


def _spy(captioner):
    """Record every generate() call (its inputs and its real output) while the real method runs."""
    calls = []
    real = captioner.model.generate

    def generate(**kwargs):
        output = real(**kwargs)
        calls.append({**kwargs, "output": output})
        return output

    captioner.model.generate = generate
    return calls


def _digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_tiny_captioner_is_an_instructblip_vicuna_layout_the_real_classes_load(captioner_model):
    for name in ("config.json", "model.safetensors", "generation_config.json", "processor_config.json",
                 "tokenizer.json", "tokenizer_config.json", "qformer_tokenizer/tokenizer.json"):
        assert (captioner_model / name).is_file(), name
    assert sum(p.stat().st_size for p in captioner_model.rglob("*") if p.is_file()) < 2 * 2**20

    processor = InstructBlipProcessor.from_pretrained(captioner_model)
    model = InstructBlipForConditionalGeneration.from_pretrained(captioner_model)
    assert isinstance(processor.tokenizer, LlamaTokenizer) and isinstance(processor.qformer_tokenizer, BertTokenizer)
    assert isinstance(model.language_model, LlamaForCausalLM) and model.config.text_config.model_type == "llama"
    assert model.config.image_token_index == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert processor.num_query_tokens == model.config.num_query_tokens

    inputs = processor(images=_frames(2, size=(1920, 1080)) + _frames(1, size=(20, 50)),
                       text=["describe the frame"] * 3, return_tensors="pt")
    size = model.config.vision_config.image_size
    assert inputs["pixel_values"].shape == (3, 3, size, size)
    ids = inputs["input_ids"][0].tolist()
    assert ids[:model.config.num_query_tokens] == [model.config.image_token_index] * model.config.num_query_tokens
    assert ids[model.config.num_query_tokens] == processor.tokenizer.bos_token_id
    assert processor.tokenizer.decode(ids, skip_special_tokens=True) == "describe the frame"
    assert processor.qformer_tokenizer.convert_ids_to_tokens(inputs["qformer_input_ids"][0]) == \
        ["[CLS]", "describe", "the", "frame", "[SEP]"]


def test_same_seed_same_bytes_other_seed_other_weights(captioner_model, tmp_path):
    assert _digests(tiny_captioner.build(tmp_path / "again", seed=0)) == _digests(captioner_model)
    other = _digests(tiny_captioner.build(tmp_path / "other", seed=1))
    assert {k for k, v in other.items() if _digests(captioner_model)[k] != v} == {"model.safetensors"}


def test_cli_writes_a_loadable_captioner(tmp_path, capsys):
    assert cli.main(["tiny-captioner", str(tmp_path / "c"), "--seed", "3"]) == 0
    assert str(tmp_path / "c") in capsys.readouterr().out
    assert _digests(tmp_path / "c") == _digests(tiny_captioner.build(tmp_path / "direct", seed=3))
    assert Captioner(tmp_path / "c", GREEDY).caption(_frames(1))[0]


def test_original_settings_are_the_defaults_and_generate_at_least_min_length_new_tokens(captioner_model):
    settings = CaptionSettings()
    assert (settings.max_length, settings.min_length, settings.do_sample, settings.num_beams, settings.temperature,
            settings.top_p, settings.repetition_penalty, settings.length_penalty) == (512, 81, True, 5, 1.0, 0.9, 1.5,
                                                                                     1.0)
    assert DEFAULT_MODEL == "Salesforce/instructblip-vicuna-7b"
    assert all(word in settings.prompt.lower() for word in ("composition", "style", "narrative"))

    captioner = Captioner(captioner_model, settings)
    assert captioner.model.dtype == torch.float32 and not captioner.model.training
    calls = _spy(captioner)
    captions = captioner.caption(_frames(3))
    assert len(captions) == 3 and all(captions)
    (call,) = calls
    assert call["num_beams"] == 5 and call["do_sample"] is True and call["top_p"] == 0.9
    prompt_length = call["input_ids"].shape[1]
    pad = captioner.processor.tokenizer.pad_token_id
    for row in call["output"]:
        new = row[prompt_length:]
        assert 81 <= int((new != pad).sum()) <= 512  # min/max count the caption's own tokens, not the prompt


def test_one_caption_per_image_in_order_and_images_matter(captioner_model):
    captioner = Captioner(captioner_model, GREEDY)
    frames = _frames(4)
    captions = captioner.caption(frames)
    assert len(captions) == 4
    assert all(caption and caption == caption.strip() and "\n" not in caption and "  " not in caption
               for caption in captions)
    assert len(set(captions)) == 4  # different images, different captions: the image reaches the language model
    assert captioner.caption(frames[::-1]) == captions[::-1]
    assert captioner.caption([]) == []


def test_batches_call_generate_once_per_batch_with_the_prompt_per_image(captioner_model):
    captioner = Captioner(captioner_model, dataclasses.replace(GREEDY, batch_size=4))
    calls = _spy(captioner)
    frames = _frames(10)
    captions = captioner.caption(frames)
    assert [call["pixel_values"].shape[0] for call in calls] == [4, 4, 2]
    for call in calls:
        assert call["input_ids"].shape[0] == call["qformer_input_ids"].shape[0] == call["pixel_values"].shape[0]
        assert (call["input_ids"] == call["input_ids"][0]).all()
        text = captioner.processor.tokenizer.decode(call["input_ids"][0], skip_special_tokens=True)
        assert text == GREEDY.prompt
    # Batched greedy decoding writes what one image at a time writes.
    assert captions == Captioner(captioner_model, GREEDY).caption(frames)


def test_min_and_max_length_bound_the_generated_tokens(captioner_model):
    for low, high in ((12, 12), (30, 45)):
        settings = CaptionSettings(min_length=low, max_length=high, batch_size=3)
        captioner = Captioner(captioner_model, settings)
        calls = _spy(captioner)
        captioner.caption(_frames(3))
        pad = captioner.processor.tokenizer.pad_token_id
        for row in calls[0]["output"]:
            new = row[calls[0]["input_ids"].shape[1]:]
            assert low <= int((new != pad).sum()) <= high
            assert len(new) <= high


def test_sampling_is_deterministic_per_seed_and_independent_of_earlier_calls(captioner_model):
    settings = CaptionSettings(min_length=8, max_length=16, batch_size=2, seed=7)
    frames = _frames(5)
    first = Captioner(captioner_model, settings)
    captions = first.caption(frames)
    assert first.caption(frames) == captions

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    fresh = Captioner(captioner_model, settings)
    fresh.caption(_frames(2)[::-1])  # an unrelated earlier call
    assert fresh.caption(frames) == captions
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random stream is left alone

    other = Captioner(captioner_model, dataclasses.replace(settings, seed=8)).caption(frames)
    assert other != captions


@pytest.mark.parametrize("model", ["missing-dir", "empty-dir", "garbage-config"])
def test_a_model_that_cannot_be_loaded_is_a_job_error_naming_it(tmp_path, model):
    path = tmp_path / model
    if model != "missing-dir":
        path.mkdir()
    if model == "garbage-config":
        (path / "config.json").write_text("{not json")
    with pytest.raises(JobError, match=r"captioning model '.*" + model + r"' could not be loaded: \S") as error:
        Captioner(path, GREEDY)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("field, value", [
    ("batch_size", 0), ("batch_size", 2.5), ("min_length", 600), ("max_length", 0), ("min_length", -1),
    ("top_p", 0), ("top_p", 1.5), ("temperature", 0), ("temperature", float("nan")), ("num_beams", 0),
    ("repetition_penalty", 0), ("prompt", "  "), ("do_sample", "yes"), ("seed", -1), ("max_length", True),
])
def test_bad_settings_are_job_errors_naming_the_field(field, value):
    with pytest.raises(JobError, match=rf"caption setting {field}="):
        CaptionSettings(**{field: value})


def test_bad_device_prompt_and_images_are_job_errors(captioner_model):
    with pytest.raises(JobError, match="captioning device 'gpu0' is invalid"):
        Captioner(captioner_model, GREEDY, device="gpu0")
    with pytest.raises(JobError, match="prompt is .* Q-Former tokens long"):
        Captioner(captioner_model, dataclasses.replace(GREEDY, prompt="frame " * 600))
    with pytest.raises(JobError, match="must be a CaptionSettings"):
        Captioner(captioner_model, {"batch_size": 2})
    captioner = Captioner(captioner_model, GREEDY)
    with pytest.raises(JobError, match="image 1 to caption is in mode RGBA, expected RGB"):
        captioner.caption([_frames(1)[0], Image.new("RGBA", (40, 40))])
    with pytest.raises(JobError, match="image 0 to caption is a str, not a PIL image"):
        captioner.caption(["frame.png"])
