"""Before anything is uploaded: the files to stage load with the jobs' own loaders.

The base model is checked with ml/contract/model_files.py's rules (safetensors only, one variant per
component), then loaded as ml/train/models.py loads it: both CLIP tokenizers, the scheduler, and the UNet, the
VAE and both text encoders through from_pretrained with model_files.load_options. The captioner is loaded as
ml/prepare/captioning.py's Captioner loads it: InstructBlipProcessor, then InstructBlipForConditionalGeneration
with load_options. Weights load onto the meta device: every safetensors file's header is read (a truncated
file is refused) and every tensor the model expects is matched by name and shape, but no weights are copied
into memory, so a 7B captioner is checked in seconds on any machine. A tensor the model expects and the files
lack is an error here, where the loaders only warn and would start from random values.

The check reads a folder of links to exactly the files that will be uploaded (`view`), so what passes is
what the jobs get.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from ml.contract.model_files import ModelFilesError, load_options, pipeline_options

# (folder, class) of the base model's weights, as the training job loads them.
BASE_MODEL_WEIGHTS = (("unet", "diffusers", "UNet2DConditionModel"), ("vae", "diffusers", "AutoencoderKL"),
                      ("text_encoder", "transformers", "CLIPTextModel"),
                      ("text_encoder_2", "transformers", "CLIPTextModelWithProjection"))


class CheckError(Exception):
    """The files do not load as the jobs load them; the message names the part, the problem and the fix."""


def view(files: dict[str, Path], folder: Path) -> Path:
    """`folder` laid out as the staged model: one link per file, to the file it is read from."""
    for name, source in files.items():
        link = folder / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(source.resolve())
    return folder


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextlib.contextmanager
def _quiet():
    """The loaders' own reports (missing keys, progress bars) are this module's to word."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    loggers = [logging.getLogger(name) for name in ("transformers", "diffusers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        transformers_logging.enable_progress_bar()
        diffusers_logging.enable_progress_bar()


def _weights(label: str, model_class, folder: Path, subfolder: str | None) -> int:
    """Load one model's weights onto the meta device; returns its tensor count."""
    where = {"subfolder": subfolder} if subfolder else {}
    try:
        model, info = model_class.from_pretrained(str(folder), device_map="meta", output_loading_info=True,
                                                  **where, **load_options(folder, subfolder))
    except ModelFilesError as error:
        raise CheckError(str(error)) from None
    except Exception as error:  # OSError, ValueError, SafetensorError...: any of them means the job cannot load it
        raise CheckError(f"{label} does not load: {_first_line(error).rstrip('.')}. Stage its complete folder "
                         "again (a download that stopped early leaves files short)") from None
    missing, mismatched = sorted(info.get("missing_keys") or []), list(info.get("mismatched_keys") or [])
    if missing:
        raise CheckError(f"{label} lacks {len(missing)} tensor(s) its config asks for ({', '.join(missing[:3])}"
                         f"{', ...' if len(missing) > 3 else ''}): its weights are incomplete or another model's; "
                         "stage its complete folder again")
    if mismatched or info.get("error_msgs"):
        found = [str(m[0]) if isinstance(m, (tuple, list)) else str(m) for m in mismatched] or info["error_msgs"]
        raise CheckError(f"{label} has tensors of other shapes than its config.json says ({', '.join(found[:3])}): "
                         "its weights and config come from different models")
    return len(model.state_dict())


def check_base_model(folder: Path) -> list[str]:
    """Raise CheckError unless the jobs load this SDXL pipeline; returns what was checked, for people."""
    import diffusers
    import transformers
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    try:
        options = pipeline_options(folder)
    except ModelFilesError as error:
        raise CheckError(str(error)) from None
    checked = []
    with _quiet():
        for subfolder in ("tokenizer", "tokenizer_2"):
            try:
                CLIPTokenizer.from_pretrained(str(folder), subfolder=subfolder)
            except Exception as error:
                raise CheckError(f"base model {subfolder}/ does not load as a CLIP tokenizer: {_first_line(error)}"
                                 ) from None
        try:
            DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler")
        except Exception as error:
            raise CheckError(f"base model scheduler/ does not load: {_first_line(error)}") from None
        checked.append("tokenizers and scheduler load")
        for subfolder, library, name in BASE_MODEL_WEIGHTS:
            model_class = getattr(diffusers if library == "diffusers" else transformers, name)
            count = _weights(f"base model {subfolder}/", model_class, folder, subfolder)
            variant = load_options(folder, subfolder).get("variant")
            checked.append(f"{subfolder}: {name}, {count} tensors matched ({variant or 'full precision'})")
    checked.append("the pipeline loads with " + ", ".join(f"{key}={value}" for key, value in options.items()))
    return checked


def check_captioner(folder: Path) -> list[str]:
    """Raise CheckError unless the prepare job loads this InstructBLIP; returns what was checked."""
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    with _quiet():
        try:
            InstructBlipProcessor.from_pretrained(str(folder))
        except Exception as error:
            raise CheckError(f"captioner: its processor (image processor and both tokenizers) does not load: "
                             f"{_first_line(error).rstrip('.')}. Stage the model's whole folder (tokenizer files, "
                             "qformer_tokenizer/, preprocessor_config.json)") from None
        count = _weights("captioner", InstructBlipForConditionalGeneration, folder, None)
    return ["processor loads", f"InstructBlipForConditionalGeneration: {count} tensors matched "
                               f"({load_options(folder).get('variant') or 'full precision'})"]
