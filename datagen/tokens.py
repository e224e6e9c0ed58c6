"""Token counting that works offline: tiktoken's cl100k_base from the copy litellm ships.

tiktoken downloads its encodings on first use; litellm bundles them for exactly this
reason, so we point tiktoken at that folder (without importing litellm, which is slow).
cl100k_base is an estimate for non-OpenAI models: good to a few percent for English.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Any


@lru_cache(maxsize=1)
def encoding() -> Any:
    if "TIKTOKEN_CACHE_DIR" not in os.environ:
        spec = importlib.util.find_spec("litellm")
        for location in (spec.submodule_search_locations or []) if spec else []:
            bundled = Path(location) / "litellm_core_utils" / "tokenizers"
            if bundled.is_dir():
                os.environ["TIKTOKEN_CACHE_DIR"] = str(bundled)
                break
    import tiktoken

    return tiktoken.get_encoding("cl100k_base")


def count_tokens(text: str) -> int:
    return len(encoding().encode(text, disallowed_special=()))
