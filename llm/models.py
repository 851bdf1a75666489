"""Models and tokenizers: any local causal-LM directory, and the built-in ``tiny-arith`` preset.

``tiny-arith`` is a small Llama-style model created from a config (no downloads) with an
offline character-level tokenizer (``tokenizers`` WordLevel, one token per character). Saved
with :func:`save_pretrained_dir`, it is a normal transformers checkpoint: any directory loads
with ``AutoTokenizer.from_pretrained`` / ``AutoModelForCausalLM.from_pretrained``.

transformers is imported inside functions only, so that importing :mod:`llm` (or running
``deepgrpo sim``) never pays for it.
"""

from __future__ import annotations

import copy
import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepgrpo.config import ConfigError, check_range

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
CHAR_ALPHABET = "0123456789+-*=,;.#?!() \n"
"""Characters of the tiny-arith tokenizer (after the 4 special tokens): enough for the
arithmetic task and for segmenter tests (sentence ends, line breaks)."""


def char_vocab() -> dict[str, int]:
    """Token -> id of the character tokenizer: specials first, then :data:`CHAR_ALPHABET`,
    padded with reserved tokens to 32 entries."""
    tokens = [PAD, BOS, EOS, UNK, *CHAR_ALPHABET]
    tokens += [f"<r{i}>" for i in range(32 - len(tokens))]
    return {t: i for i, t in enumerate(tokens)}


def build_char_tokenizer() -> Any:
    """An offline character-level ``PreTrainedTokenizerFast`` (one token per character, a BOS
    token prepended to every encoded text, EOS = ``<eos>``, pad = ``<pad>``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = char_vocab()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, padding_side="left", clean_up_tokenization_spaces=False)
    return fast


@dataclass
class TinyModelConfig:
    """Size of the ``tiny-arith`` Llama-style model (defaults: ~0.33 M parameters, which learns
    3-5-term addition chains in about 5 minutes of SFT on 2 idle CPU cores).

    hidden_size: width of the model (embedding and attention size).
    intermediate_size: width of each MLP's hidden layer.
    num_hidden_layers: transformer blocks.
    num_attention_heads: attention heads per block (hidden_size must be a multiple of it).
    max_position_embeddings: longest prompt + response in tokens.
    """

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 128

    def __post_init__(self) -> None:
        o = type(self).__name__
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            check_range(o, name, getattr(self, name), 1, None, integer=True)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{o}.hidden_size = {self.hidden_size} is invalid: expected a multiple of "
                              f"num_attention_heads = {self.num_attention_heads}")


def build_tiny_model(tokenizer: Any, config: TinyModelConfig | None = None, seed: int = 0) -> Any:
    """A freshly initialised Llama causal LM for ``tokenizer`` (built from a config, no download)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_model_config(tokenizer, config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    return model.float()


def tiny_model_config(tokenizer: Any, config: TinyModelConfig | None = None) -> Any:
    """The transformers ``LlamaConfig`` of :func:`build_tiny_model` (no weights)."""
    from transformers import LlamaConfig

    c = config or TinyModelConfig()
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=c.hidden_size,
                       intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                       num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_attention_heads,
                       max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=True,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


def is_model_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` looks like a local transformers checkpoint: a ``config.json`` that is a
    JSON object with a ``model_type`` (a training run's own ``config.json`` is not)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        d = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(d, dict) and "model_type" in d


def check_model_dir(path: str | os.PathLike, option: str = "--model") -> Path:
    """``path`` if it holds a loadable model and tokenizer, else a :class:`ConfigError` naming
    ``option``, the directory and what is wrong (no directory, no/empty/corrupt ``config.json``,
    unknown model type, no weights, no tokenizer)."""
    p = Path(path)

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{option} = {str(path)!r} is invalid: {why}", owner=option, value=str(path), allowed=why)

    if not p.is_dir():
        raise bad("no such directory")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise bad("not a model directory (no config.json)")
    try:
        d = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"config.json is empty or not valid JSON ({str(e).splitlines()[0] if str(e) else 'empty'})") \
            from None
    if not isinstance(d, dict) or "model_type" not in d:
        raise bad("config.json has no model_type (is this a training run's directory? its model is in checkpoint/)")
    from transformers import CONFIG_MAPPING
    if d["model_type"] not in CONFIG_MAPPING:
        raise bad(f"config.json has model_type {d['model_type']!r}, unknown to this transformers")
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if not any((p / w).is_file() for w in weights):
        raise bad(f"no weights ({' or '.join(weights[:3])})")
    if not any((p / t).is_file() for t in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise bad("no tokenizer (tokenizer.json / tokenizer_config.json)")
    return p


def load_tokenizer(path: str | os.PathLike, option: str = "--model") -> Any:
    """The tokenizer saved in ``path`` (left padding; pad = EOS if the tokenizer has no pad);
    a directory it cannot be loaded from is a :class:`ConfigError` naming ``option``."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a broken directory
        raise ConfigError(f"{option} = {str(path)!r} is invalid: cannot load its tokenizer ({_first_line(e)})",
                          owner=option, value=str(path)) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_causal_lm(path: str | os.PathLike, dtype: torch.dtype = torch.float32, trainable: bool = True,
                   option: str = "--model") -> Any:
    """The causal LM in local directory ``path``. ``trainable=False`` gives a frozen copy
    (``eval()``, ``requires_grad=False``) for the reference policy. A directory it cannot be
    loaded from (corrupt config, truncated weights...) is a :class:`ConfigError` naming ``option``."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except Exception as e:  # noqa: BLE001 - safetensors/transformers raise many types for a broken file
        raise ConfigError(f"{option} = {str(path)!r} is invalid: cannot load the model ({_first_line(e)})",
                          owner=option, value=str(path)) from None
    if trainable:
        model.train()
    else:
        freeze(model)
    return model


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0][:200] if text else type(e).__name__)


def freeze(model: Any) -> Any:
    """Put ``model`` in eval mode and turn off gradients of all its parameters (in place)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def frozen_copy(model: Any) -> Any:
    """A deep, frozen copy of ``model`` (the reference policy when no separate directory is given)."""
    return freeze(copy.deepcopy(model))


def named_os_error(e: OSError, path: str | os.PathLike) -> OSError:
    """``e`` itself if it names a file, else the same error naming ``path`` (a failed write
    inside a library often carries no file name, and "no space left on device" alone does not
    say where)."""
    if e.filename is not None:
        return e
    return OSError(e.errno, e.strerror or os.strerror(e.errno or 0), str(path))


def no_space_left(path: str | os.PathLike, error: BaseException | None = None) -> bool:
    """True if ``error`` (or an error it was raised from) says the disk is full (a serializer's
    own error type carrying "No space left on device" or "os error 28"), or if the file system
    holding ``path`` (or its nearest existing parent) has no free block left for this user."""
    seen = error
    while seen is not None:
        text = str(seen)
        if getattr(seen, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in text \
                or f"os error {errno.ENOSPC}" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return False
    return st.f_bavail == 0


def save_pretrained_dir(model: Any, tokenizer: Any, path: str | os.PathLike) -> Path:
    """Save ``model`` and ``tokenizer`` as a normal transformers checkpoint in ``path``
    (safetensors weights, config, tokenizer files). A failed write is an ``OSError`` naming
    ``path``: a full disk is ENOSPC even where a serializer reports it otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(path), safe_serialization=True)
        tokenizer.save_pretrained(str(path))
    except OSError as e:
        raise named_os_error(e, path) from e
    except Exception as e:
        if no_space_left(path, e):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise
    return path


@dataclass(frozen=True)
class ModelLimits:
    """What a model's config says about the memory of sampling from it.

    context: longest prompt + response in tokens (``max_position_embeddings`` or the config's
        equivalent); None if the config names none.
    kv_bytes_per_token: bytes of KV cache one token of one sequence takes in float32 (2 x
        layers x key/value heads x head size x 4); 0 if the config does not say.
    """

    context: int | None
    kv_bytes_per_token: int


def model_limits(path: str | os.PathLike, option: str = "--model") -> ModelLimits:
    """The :class:`ModelLimits` of the model directory ``path`` (its config only: no weights
    are loaded)."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a broken config
        raise ConfigError(f"{option} = {str(path)!r} is invalid: cannot read its config ({_first_line(e)})",
                          owner=option, value=str(path)) from None
    return limits_of_config(cfg)


def limits_of_config(cfg: Any) -> ModelLimits:
    """The :class:`ModelLimits` of a transformers config object (its text part for a
    multimodal model)."""
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    context = next((int(v) for k in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
                    if isinstance(v := getattr(text, k, None), int) and v > 0), None)
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None)
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or (hidden // heads if hidden and heads else None)
    kv = 2 * layers * kv_heads * head_dim * 4 if layers and kv_heads and head_dim else 0
    return ModelLimits(context=context, kv_bytes_per_token=int(kv))


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
