"""A complete InstructBLIP with tiny random weights, built offline.

Same architecture and file layout as Salesforce/instructblip-vicuna-7b (an EVA-style vision
encoder, a Q-Former with its own BERT-style tokenizer, a Llama (Vicuna) language model with a
Llama-style tokenizer, a BLIP image processor), scaled down so tests and the local stack caption
images on a CPU in seconds. The tokenizers are character-level (the Q-Former's also knows the
prompt's words), built with the `tokenizers` library, so nothing is downloaded. Its captions are
nonsense strings of characters; the code path that loads and runs it is the real one.
"""

from __future__ import annotations

import string
from pathlib import Path

IMAGE_SIZE = 32
PATCH_SIZE = 8
NUM_QUERY_TOKENS = 8
HIDDEN = 32
# Long enough for the query tokens, a character-level prompt of a few hundred characters and 512 new tokens.
MAX_POSITIONS = 2048
# Trained weights make the caption depend on the image. Random ones at the usual 0.02 barely let it through
# (the Q-Former's cross-attention and the language model's attention to the query tokens are near-zero), so
# every image would get the same caption; at 0.2, and with random rather than zero query tokens, it does not.
INIT_STD = 0.2

# Llama's special tokens sit first, as in the Vicuna vocabulary, then characters. Vicuna's 256 byte-fallback
# tokens are left out: in a vocabulary this small a random model would emit almost nothing else, and they
# decode to replacement characters. Characters outside the vocabulary encode as <unk>.
_LLAMA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
_CHARACTERS = ["▁", *string.ascii_letters, *string.digits, *string.punctuation]
# The Q-Former's WordPiece vocabulary: BERT's specials, whole words a storyboard prompt uses, characters.
_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORDS = sorted(set("""
a an and the of in on at to for with as is are this that these it its by from or what which how
describe detail detailed details image frame storyboard picture scene shot composition style
narrative element elements including include camera angle framing lighting color colors mood
character characters action setting story visual visually art artistic please write caption
""".split()))


def _llama_tokenizer():
    from transformers import LlamaTokenizer

    vocab = {token: index for index, token in enumerate(_LLAMA_SPECIALS + _CHARACTERS)}
    return LlamaTokenizer(vocab=vocab, merges=[], pad_token="<pad>", add_bos_token=True, add_eos_token=False,
                          model_max_length=MAX_POSITIONS)


def _qformer_tokenizer():
    from transformers import BertTokenizer

    lower = string.ascii_lowercase + string.digits
    tokens = _BERT_SPECIALS + _WORDS + list(lower + string.punctuation) + [f"##{c}" for c in lower]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return BertTokenizer(vocab=vocab, model_max_length=512)


def _config(text_vocab_size: int, qformer_vocab_size: int, image_token_index: int, pad_token_id: int):
    from transformers import InstructBlipConfig, InstructBlipQFormerConfig, InstructBlipVisionConfig, LlamaConfig

    vision = InstructBlipVisionConfig(
        hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, initializer_range=INIT_STD,
    )
    qformer = InstructBlipQFormerConfig(
        vocab_size=qformer_vocab_size, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=512, cross_attention_frequency=1, encoder_hidden_size=HIDDEN,
        initializer_range=INIT_STD,
    )
    text = LlamaConfig(
        vocab_size=text_vocab_size, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=MAX_POSITIONS,
        bos_token_id=1, eos_token_id=2, pad_token_id=pad_token_id, tie_word_embeddings=False,
        initializer_range=INIT_STD,
    )
    return InstructBlipConfig(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
        num_query_tokens=NUM_QUERY_TOKENS, image_token_index=image_token_index, initializer_range=INIT_STD,
    )


def build(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny InstructBLIP (weights, config, processor) to out_dir and return the path."""
    import torch
    from transformers import BlipImageProcessorPil, InstructBlipForConditionalGeneration, InstructBlipProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The PIL backend: the torchvision one is not installed everywhere this runs.
    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = InstructBlipProcessor(
        image_processor=image_processor, tokenizer=_llama_tokenizer(), qformer_tokenizer=_qformer_tokenizer(),
        num_query_tokens=NUM_QUERY_TOKENS,
    )
    tokenizer = processor.tokenizer
    config = _config(
        text_vocab_size=len(tokenizer), qformer_vocab_size=len(processor.qformer_tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed))
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out
