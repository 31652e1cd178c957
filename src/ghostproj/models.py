"""Loading causal-LM checkpoints and their tokenizers, with one-sentence errors."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch

from .errors import GhostprojError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GhostprojError("--device cuda was asked for, but no CUDA device is available.")
    try:
        return torch.device(device)
    except RuntimeError:
        raise GhostprojError(f"Unknown device '{device}'; use auto, cpu or cuda.") from None


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise GhostprojError(f"Unknown --dtype '{dtype}'; choose one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def load_model(path: str, dtype: str = "float32", device: str = "auto", revision: str | None = None,
               adapter: str | None = None, meta: bool = False):
    """(model in eval mode on the device, tokenizer) from a local directory or hub id. On
    the meta device (``meta``) the model has its shapes and no weights (``project --dry-run``)."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    torch_dtype = resolve_dtype(dtype)
    dev = torch.device("meta") if meta else resolve_device(device)
    local = Path(path)
    if not local.exists() and not _HUB_ID.match(path):
        raise GhostprojError(f"Model directory {path} does not exist.")
    if local.exists() and not (local / "config.json").is_file():
        raise GhostprojError(f"{path} is not a model directory (it has no config.json).")
    if local.is_dir():
        unreadable = [f.name for f in sorted(local.iterdir()) if f.is_file() and not os.access(f, os.R_OK)]
        if unreadable:
            raise GhostprojError(f"Cannot read {local / unreadable[0]}: permission denied (fix its permissions).")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        extra = {"revision": revision} if revision else {}
        if dev.type == "meta":  # shapes only: the config builds the model, no weight is read
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, **extra), dtype=torch_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **extra)
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    except OSError as exc:
        if local.exists():
            raise GhostprojError(f"Cannot load the model in {path}: {str(exc).splitlines()[0]}") from None
        raise GhostprojError(
            f"Cannot load model '{path}': it is not a local directory and the hub could not be reached "
            "(set HF_HUB_OFFLINE=0 and check the network, or pass a local directory)."
        ) from None
    except ValueError as exc:
        raise GhostprojError(f"Cannot load '{path}' as a causal language model: {str(exc).splitlines()[0]}") from None
    except SafetensorError as exc:
        raise GhostprojError(f"The weights in {path} are damaged ({str(exc).splitlines()[0]}); download or save the "
                             "model again.") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if adapter is not None:
        model = _load_adapter(model, adapter)
    model.to(dev)
    model.eval()
    return model, tokenizer


def enable_gradient_checkpointing(model) -> int:
    """HF's non-reentrant activation checkpointing of every decoder layer, with dropout kept
    off: HF checkpoints a layer only while that layer is in training mode, so the layers
    alone are switched to it and every module inside them stays in eval mode. Returns how
    many layers are checkpointed."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not getattr(model, "supports_gradient_checkpointing", False):
        raise GhostprojError(f"{type(model).__name__} does not support gradient checkpointing; drop "
                             "--gradient-checkpointing.")
    enable = getattr(model, "activation_checkpointing_enable", None)  # the name from transformers 5.x on
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise GhostprojError(f"{type(model).__name__} has no layer HF can checkpoint; drop --gradient-checkpointing.")
    for layer in layers:
        layer.training = True
    return len(layers)


def _load_adapter(model, adapter: str):
    """Wrap ``model`` with a PEFT (LoRA) adapter from a local directory."""
    try:
        from peft import PeftModel
    except ImportError:
        raise GhostprojError("Loading --adapter needs the optional extra: pip install 'ghostproj[peft]'.") from None
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise GhostprojError(f"{adapter} is not a PEFT adapter directory (it has no adapter_config.json).")
    try:
        return PeftModel.from_pretrained(model, adapter)
    except Exception as exc:  # peft raises several types for a mismatched adapter
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GhostprojError(f"The adapter in {adapter} does not match the model: {first[:300]}") from None


def position_limit(model) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def config_hash(model) -> str:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return ""
    return hashlib.sha256(cfg.to_json_string(use_diff=False).encode()).hexdigest()


def pad_token_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0
