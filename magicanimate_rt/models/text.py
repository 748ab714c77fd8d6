"""The text embedding (REFERENCE 3.1): CLIP's ``last_hidden_state`` for the empty prompt.

MagicAnimate's prompt and negative prompt are both "", so the embedding (1, 77, Cx) is a
constant of the model set: it is computed once when a model set is loaded (and stored in
engine directories), never per request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ..errors import ModelLoadError


def build_text_encoder(config: Mapping[str, Any]):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = {k: v for k, v in config.items() if k not in ("architectures", "transformers_version", "_name_or_path")}
    return CLIPTextModel(CLIPTextConfig(**cfg)).eval()


def tokenize_empty(tokenizer_dir: Path) -> Tensor:
    """Token ids (1, 77) of "" padded to the tokenizer's max length."""
    from transformers import CLIPTokenizer

    try:
        tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as e:  # transformers raises many kinds for a broken tokenizer
        raise ModelLoadError(f"{tokenizer_dir}: cannot load the CLIP tokenizer ({type(e).__name__}: {e})".splitlines()[0]) from None
    return tok("", padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def empty_prompt_embedding(text_encoder, input_ids: Tensor) -> Tensor:
    """(1, 77) ids -> (1, 77, Cx) float32 ``last_hidden_state``."""
    return text_encoder(input_ids).last_hidden_state.float()
