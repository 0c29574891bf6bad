"""Training options beyond diffusers' script (issue 22): caption dropout and shuffling, timestep bias,
optimizers, the LoRA's moving average and DoRA; each trained on the tiny SDXL to do what it says."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ml.contract.container import JobError
from ml.contract.hyperparameters import HyperparameterError, parse
from ml.dataset.captions import shuffled, variant
from ml.train.ema import decay_at
from ml.train.frozen import CaptionVariants
from ml.train.seeds import generator
from ml.train.steps import sample_timesteps, timestep_weights

CAPTION = "ohwx, storyboard frame, ink outline, a red circle, flat colours, hard shadow"


def _assert_same_weights(actual: dict, expected: dict, atol: float = 1e-5) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=0)


def _captions(seed: int, epochs: int, **options) -> list[str]:
    variants = CaptionVariants([CAPTION], seed, options.get("dropout", 0.0), options.get("shuffle", True),
                               options.get("keep_tokens", 0), tokenizers=())
    return [variants.caption(0, epoch)[0] for epoch in range(epochs)]


# -- captions -----------------------------------------------------------------------------------------


def test_keep_tokens_keeps_the_leading_tags_in_place_and_shuffles_the_rest():
    for seed in range(20):
        tags = shuffled(CAPTION, 2, generator(seed)).split(", ")
        assert tags[:2] == ["ohwx", "storyboard frame"]
        assert sorted(tags) == sorted(CAPTION.split(", "))


def test_shuffle_changes_the_order_across_epochs_and_is_reproducible_for_a_seed():
    first = _captions(seed=7, epochs=6, keep_tokens=1)
    assert len(set(first)) > 1  # the order changes from epoch to epoch
    assert all(caption.startswith("ohwx, ") for caption in first)
    assert _captions(seed=7, epochs=6, keep_tokens=1) == first
    assert _captions(seed=8, epochs=6, keep_tokens=1) != first


def test_caption_dropout_drops_its_share_and_never_at_zero():
    drawn = [variant(CAPTION, 0.3, False, 0, generator(5, i)) for i in range(2000)]
    share = sum(dropped for _, dropped in drawn) / len(drawn)
    assert 0.25 < share < 0.35
    assert all(text == "" for text, dropped in drawn if dropped)
    assert all(not variant(CAPTION, 0.0, True, 0, generator(5, i))[1] for i in range(200))
    assert all(variant(CAPTION, 1.0, True, 0, generator(5, i)) == ("", True) for i in range(200))


@pytest.mark.parametrize("value", ["-0.1", "1.5", "x"])
def test_caption_dropout_outside_zero_to_one_is_refused(value):
    with pytest.raises(HyperparameterError, match="caption_dropout"):
        parse({"caption_dropout": value})


def _dataset_with_empty_captions(dataset, folder):
    folder.mkdir()
    rows = []
    for line in (dataset / "metadata.jsonl").read_text().splitlines():
        row = json.loads(line)
        (folder / row["file_name"]).symlink_to(dataset / row["file_name"])
        rows.append(json.dumps({**row, "text": ""}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.mark.parametrize("options", [{}, {"shuffle_caption": True}, {"train_text_encoder": True}],
                         ids=["cached", "shuffled", "text-encoder"])
def test_caption_dropout_one_trains_every_step_with_the_empty_prompt(make_job, dataset, tmp_path, options):
    """Every caption dropped is training on empty captions: the same weights, whichever way the
    embeddings are made (cached with the empty one beside, encoded per step, or by the trained encoders)."""
    empty = _dataset_with_empty_captions(dataset, tmp_path / "empty-captions")
    dropped = make_job({"caption_dropout": 1.0, "max_train_steps": 3, **options}).run()
    assert dropped.returncode == 0, dropped.stdout
    with safe_open(dropped.model / "pytorch_lora_weights_kohya.safetensors", "pt") as handle:
        assert handle.metadata()["ss_caption_dropout_rate"] == "1"
    reference = make_job({"max_train_steps": 3, **options}, train=empty).run()
    assert reference.returncode == 0, reference.stdout
    _assert_same_weights(load_file(dropped.lora), load_file(reference.lora), atol=1e-4)


def test_shuffled_captions_train_reproducibly_and_unlike_the_plain_ones(make_job):
    options = {"shuffle_caption": True, "keep_tokens": 1, "max_train_steps": 8}  # 10 images, batch 2: two epochs
    first, again, plain = make_job(options).run(), make_job(options).run(), make_job({"max_train_steps": 8}).run()
    for job in (first, again, plain):
        assert job.returncode == 0, job.stdout
    assert "shuffle_caption: captions change order every epoch" in first.stdout
    _assert_same_weights(load_file(again.lora), load_file(first.lora), atol=0)
    assert any(not torch.equal(load_file(plain.lora)[k], v) for k, v in load_file(first.lora).items())


# -- timestep bias ------------------------------------------------------------------------------------


def _timesteps(**options) -> torch.Tensor:
    hp = parse({key: str(value) for key, value in options.items()})
    return sample_timesteps(hp, 1000, 20_000, generator(11))


def test_timestep_bias_shifts_the_sampled_timesteps_as_asked():
    uniform = _timesteps()
    assert abs(uniform.float().mean() - 499.5) < 10
    earlier = _timesteps(timestep_bias="earlier", timestep_bias_strength=4, timestep_bias_portion=0.25)
    later = _timesteps(timestep_bias="later", timestep_bias_strength=4, timestep_bias_portion=0.25)
    # A quarter weighted 4 times: 4 / (4 + 3) = 57% of the draws fall in it, against 25% uniformly.
    assert 0.55 < (earlier < 250).float().mean() < 0.60
    assert 0.55 < (later >= 750).float().mean() < 0.60
    assert earlier.float().mean() < 400 < 600 < later.float().mean()
    ranged = _timesteps(timestep_bias="range", timestep_bias_begin=200, timestep_bias_end=300,
                        timestep_bias_strength=9)
    assert 0.48 < ((ranged >= 200) & (ranged < 300)).float().mean() < 0.52  # 9 * 100 / (9 * 100 + 900)
    weaker = _timesteps(timestep_bias="later", timestep_bias_strength=0.25)
    assert (weaker >= 750).float().mean() < 0.1  # a strength below 1 steers away
    assert torch.equal(_timesteps(timestep_bias="later"), _timesteps(timestep_bias="later"))  # per seed


def test_timestep_bias_values_are_checked():
    with pytest.raises(HyperparameterError, match="timestep_bias: expected one of earlier, later, range"):
        parse({"timestep_bias": "middle"})
    with pytest.raises(HyperparameterError, match="timestep_bias_begin must be below timestep_bias_end"):
        parse({"timestep_bias": "range", "timestep_bias_begin": "500", "timestep_bias_end": "400"})
    with pytest.raises(HyperparameterError, match="timestep_bias_strength"):
        parse({"timestep_bias_strength": "0"})
    assert parse({"timestep_bias": "none"}).timestep_bias is None
    with pytest.raises(JobError, match="timestep_bias_end 1200 is beyond the scheduler's 1000"):
        timestep_weights(parse({"timestep_bias": "range", "timestep_bias_end": "1200"}), 1000)


def test_timestep_bias_trains(make_job):
    job = make_job({"timestep_bias": "later", "timestep_bias_strength": 3}).run()
    assert job.returncode == 0, job.stdout
    assert job.summary()["fast_path"]
    beyond = make_job({"timestep_bias": "range", "timestep_bias_begin": 900, "timestep_bias_end": 1200}).run()
    assert beyond.returncode == 1
    assert beyond.failure.startswith("timestep_bias_end 1200 is beyond the scheduler's 1000 training timesteps")


# -- optimizers ---------------------------------------------------------------------------------------


def _ups(state: dict) -> list[torch.Tensor]:
    """LoRA up projections, which peft's gaussian initialisation starts at zero."""
    return [tensor for key, tensor in state.items() if "lora.up" in key or "lora_B" in key]


@pytest.mark.parametrize("optimizer", ["adamw", "prodigy", "adafactor"])
def test_each_optimizer_trains_and_changes_the_weights(make_job, optimizer):
    job = make_job({"optimizer": optimizer, "max_train_steps": 3}).run()
    assert job.returncode == 0, job.stdout
    assert all(up.abs().max() > 0 for up in _ups(load_file(job.lora)))
    assert job.summary()["fast_path"] == (optimizer == "adamw")
    with safe_open(job.model / "pytorch_lora_weights_kohya.safetensors", "pt") as handle:
        assert handle.metadata()["ss_optimizer"].lower().endswith(optimizer)
    if optimizer != "adamw":
        assert f"fast path off: optimizer {optimizer}" in job.stdout


def test_use_8bit_adam_is_optimizer_adamw8bit_and_conflicts_are_refused():
    assert parse({"use_8bit_adam": "true"}).optimizer == "adamw8bit"
    assert parse({"optimizer": "adamw8bit"}).use_8bit_adam
    with pytest.raises(HyperparameterError, match="use_8bit_adam: it means optimizer adamw8bit, which conflicts"):
        parse({"use_8bit_adam": "true", "optimizer": "prodigy"})
    with pytest.raises(HyperparameterError, match="optimizer: expected one of adamw, adamw8bit, prodigy, adafactor"):
        parse({"optimizer": "sgd"})


# -- moving average -----------------------------------------------------------------------------------


def _to_diffusers(state: dict) -> dict:
    from diffusers.utils import convert_state_dict_to_diffusers

    return {f"unet.{key}": tensor for key, tensor in convert_state_dict_to_diffusers(state).items()}


def test_ema_file_is_the_moving_average_of_the_trained_weights(make_job):
    decay = 0.5
    job = make_job({"ema_decay": decay, "max_train_steps": 3, "checkpointing_steps": 1,
                    "checkpoints_total_limit": 5}).run()
    assert job.returncode == 0, job.stdout
    ema, raw = load_file(job.lora), load_file(job.model / "pytorch_lora_weights_raw.safetensors")
    assert ema.keys() == raw.keys()
    assert all(not torch.equal(ema[key], raw[key]) for key in ema if "lora.up" in key or "lora_B" in key)
    # The weights after steps 1 and 2 (checkpoints) and 3 (the raw file); up projections start at zero,
    # so their average is a function of those three alone.
    steps = [_to_diffusers(load_file(job.checkpoints / f"checkpoint-{n}" / "lora_model_0.safetensors"))
             for n in (1, 2)] + [raw]
    ups = [key for key in raw if "lora.up" in key or "lora_B" in key]
    assert ups
    for key in ups:
        average = torch.zeros_like(raw[key])
        for n, weights in enumerate(steps):
            d = decay_at(decay, n)
            average = d * average + (1 - d) * weights[key]
        torch.testing.assert_close(ema[key], average, atol=1e-6, rtol=1e-5)
    assert decay_at(0.5, 0) == 0.1 and decay_at(0.5, 10) == 0.5
    kohya = load_file(job.model / "pytorch_lora_weights_kohya.safetensors")
    assert kohya  # written from the average too


def test_resumed_run_with_ema_ends_with_the_same_average_as_an_uninterrupted_one(make_job):
    options = {"ema_decay": 0.8, "max_train_steps": 5, "checkpointing_steps": 2, "checkpoints_total_limit": 5}
    whole = make_job(options).run()
    assert whole.returncode == 0, whole.stdout
    resumed = make_job(options)
    shutil.copytree(whole.checkpoints / "checkpoint-2", resumed.checkpoints / "checkpoint-2")
    resumed.run()
    assert resumed.returncode == 0, resumed.stdout
    assert resumed.summary()["resumed_from_step"] == 2
    _assert_same_weights(load_file(resumed.lora), load_file(whole.lora))
    _assert_same_weights(load_file(resumed.model / "pytorch_lora_weights_raw.safetensors"),
                         load_file(whole.model / "pytorch_lora_weights_raw.safetensors"))


def test_a_run_with_every_option_resumes_to_the_same_weights(make_job):
    """Caption variants (here by trained text encoders), biased timesteps and the average are functions of
    (seed, position) or checkpointed. Five batches an epoch: the resumed steps 5 and 6 cross into the second."""
    options = {"max_train_steps": 6, "checkpointing_steps": 4, "train_text_encoder": True, "caption_dropout": 0.4,
               "shuffle_caption": True, "keep_tokens": 1, "timestep_bias": "range", "timestep_bias_begin": 100,
               "timestep_bias_end": 600, "ema_decay": 0.9, "optimizer": "adafactor"}
    whole = make_job(options).run()
    assert whole.returncode == 0, whole.stdout
    resumed = make_job(options)
    shutil.copytree(whole.checkpoints / "checkpoint-4", resumed.checkpoints / "checkpoint-4")
    resumed.run()
    assert resumed.returncode == 0, resumed.stdout
    assert resumed.summary()["resumed_from_step"] == 4
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_raw.safetensors"):
        _assert_same_weights(load_file(resumed.model / name), load_file(whole.model / name))


def test_a_checkpoint_without_ema_is_not_resumed_with_it(make_job):
    plain = make_job({"max_train_steps": 4, "checkpointing_steps": 2}).run()
    assert plain.returncode == 0, plain.stdout
    averaged = make_job({"max_train_steps": 4, "checkpointing_steps": 2, "ema_decay": 0.9})
    shutil.copytree(plain.checkpoints / "checkpoint-2", averaged.checkpoints / "checkpoint-2")
    averaged.run()
    assert averaged.returncode == 1
    assert "written with ema_decay=0.0, this job has ema_decay=0.9" in averaged.failure


def test_ema_decay_must_be_below_one():
    with pytest.raises(HyperparameterError, match=r"ema_decay: must be in \[0, 1\)"):
        parse({"ema_decay": "1"})


# -- DoRA ---------------------------------------------------------------------------------------------


def test_dora_trains_and_the_kohya_file_carries_dora_scale(make_job):
    # The validation image loads the saved file into diffusers' pipeline, as the endpoint does.
    job = make_job({"use_dora": True, "max_train_steps": 3, "validation_prompt": "a red circle",
                    "num_validation_images": 1, "num_validation_inference_steps": 2}).run()
    assert job.returncode == 0, job.stdout
    assert job.summary()["fast_path"] and job.summary()["samples"]
    kohya = load_file(job.model / "pytorch_lora_weights_kohya.safetensors")
    assert any(key.endswith(".dora_scale") for key in kohya)
    state = load_file(job.lora)
    assert any("magnitude" in key for key in state)
    assert all(up.abs().max() > 0 for up in _ups(state))
