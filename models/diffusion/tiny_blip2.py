"""Random-weight BLIP-2 image-text models (`Blip2ForImageTextRetrieval`), built in code.

Tests and benchmarks cannot download BLIP-2, so they build the same class with random weights, a
BERT WordPiece vocabulary and a BLIP image-processor config written here, save all three with
`save_pretrained` into one directory and load it through the production loader, exactly like a
real `Salesforce/blip2-itm-vit-g` directory.

Sizes: "tiny" for unit tests (its Q-Former as wide as the tiny SD's cross-attention, 32),
"small" for CPU benchmarks (a narrow ViT and a Q-Former as wide as the small SD's 192), and
"blip2" with blip2-itm-vit-g's exact configs (ViT-g, 32 queries, 768-wide Q-Former) for GPU
benchmarks.
"""

import string
from pathlib import Path

import torch
from transformers import BertTokenizer, Blip2Config, Blip2ForImageTextRetrieval, BlipImageProcessorPil

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Whole-word tokens for the prompt templates and a few defect names; any other word still
# tokenizes, letter by letter (WordPiece continuation pieces "##a" ... "##z").
VOCABULARY_WORDS = ("this", "is", "an", "image", "with", "a", "photo", "of", "crack", "scratch", "hole", "chip")

_VIT_G = {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39, "num_attention_heads": 16,
          "image_size": 224, "patch_size": 14}
_QFORMER = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
            "cross_attention_frequency": 2}

ARCHITECTURES = {
    "tiny": {
        "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "image_size": 32, "patch_size": 8},
        "qformer": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                    "cross_attention_frequency": 2},
        "num_query_tokens": 8,
    },
    "small": {
        "vision": {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 12, "num_attention_heads": 6,
                   "image_size": 224, "patch_size": 14},
        "qformer": {"hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 768,
                    "cross_attention_frequency": 2},
        "num_query_tokens": 32,
    },
    "blip2": {"vision": _VIT_G, "qformer": _QFORMER, "num_query_tokens": 32},
}


def build_random_blip2(
    path: str | Path, architecture: str = "tiny", *, seed: int = 0, device: str = "cpu"
) -> Path:
    """Build a random-weight `Blip2ForImageTextRetrieval` of one of `ARCHITECTURES` with its
    tokenizer and image processor, saved at `path`. `device` only speeds up building. Returns the directory."""
    spec = ARCHITECTURES[architecture]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _write_and_load_tokenizer(path)
    config = Blip2Config(
        # The vision tower's default init (std 1e-10) would make every patch look alike.
        vision_config={**spec["vision"], "initializer_range": 0.02},
        qformer_config={**spec["qformer"], "vocab_size": len(tokenizer), "use_qformer_text_input": True,
                        "pad_token_id": tokenizer.pad_token_id},
        num_query_tokens=spec["num_query_tokens"],
        architectures=["Blip2ForImageTextRetrieval"],
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = Blip2ForImageTextRetrieval(config)
    model.save_pretrained(path)
    side = spec["vision"]["image_size"]
    BlipImageProcessorPil(size={"height": side, "width": side}).save_pretrained(path)
    return path


def _write_and_load_tokenizer(folder: Path) -> BertTokenizer:
    """A BERT WordPiece tokenizer over a small vocabulary, saved in `folder` (vocab.txt, tokenizer.json)."""
    pieces = [*string.ascii_lowercase, *string.digits, *(f"##{c}" for c in string.ascii_lowercase + string.digits)]
    tokens = dict.fromkeys([*SPECIAL_TOKENS, *VOCABULARY_WORDS, *pieces, *string.punctuation])
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(tokens)}, do_lower_case=True,
                              model_max_length=512)
    tokenizer.save_pretrained(folder)
    return tokenizer
