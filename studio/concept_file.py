"""Concept files and training checkpoints (docs/ARCHITECTURE.md, "Files"): the codec of a
:class:`studio.concept.Concept`, as strict data.

Concept files are safetensors: the mapper's tensors (``mapper.<name>``), the reference image
embedding, and one JSON string of metadata (key ``personamagic``). A concept file may also carry
the trainer state it ended with (tensors ``training.<path>``), so that training can go on in
another session; training checkpoints use the same container for that state alone. Files are
read with safetensors only: nothing a user hands us is unpickled. What a wrong file is comes
from the one file sniffer, studio/filetypes.py.
"""
from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from studio.concept import Concept
from studio.errors import StudioError
from studio.filetypes import HEAD_BYTES, sniff
from studio.mapper import build_mapper

if TYPE_CHECKING:
    from studio.backbone import Backbone


# =========================================================================== concept files
CONCEPT_FORMAT = "personamagic-studio-concept"
CHECKPOINT_FORMAT = "personamagic-studio-checkpoint"
FORMAT_VERSION = 1
METADATA_KEY = "personamagic"
# A concept is a few MB and its safetensors header a few KB (the trainer state's JSON tree
# included): anything far larger is refused before it is parsed.
MAX_HEADER_BYTES = 8_000_000
MAX_METADATA_BYTES = 4_000_000
# JSON nesting of the metadata (the trainer state tree is ~8 deep) and of the stored config.
MAX_METADATA_DEPTH = 24
# Integers in a concept file have at most this many digits (file offsets, RNG words).
MAX_INT_DIGITS = 20
# Sizes of the mapper a file may ask for (SD 1.x: 768 wide, 200 anchors, 2048 encoding).
MAPPER_LIMITS = {
    "num_tokens": (1, 16), "num_anchors": (1, 4096), "hidden_dim": (1, 4096),
    "time_encoding_dim": (2, 8192), "image_embed_dim": (1, 4096), "token_dim": (1, 4096),
}
# Tensor dtypes a concept file may hold: the mapper and embedding are float32; the trainer
# state also has byte RNG states and integer counters.
_MAPPER_DTYPES = frozenset({"F32"})
_STATE_DTYPES = frozenset({"F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL"})
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class ConceptFileError(StudioError, ValueError):
    """A concept (or checkpoint) file cannot be written or read; the message says why and what to do."""


def _studio_version() -> str:
    import studio

    return getattr(studio, "__version__", "dev")


def concept_to_bytes(concept: Concept, training_state: dict[str, Any] | None = None) -> bytes:
    """The concept as the bytes of a ``.safetensors`` concept file (for downloads and saving),
    with the trainer state that produced it when given (see :func:`read_training_state`)."""
    tensors = {f"mapper.{name}": value.detach().cpu().contiguous() for name, value in concept.mapper.state_dict().items()}
    if concept.image_embedding is not None:
        tensors["image_embedding"] = concept.image_embedding.detach().float().cpu().contiguous()
    extra: dict[str, Any] = {}
    if training_state is not None:
        state = dict(training_state)
        if _same_tensors(state.get("mapper"), concept.mapper.state_dict()):
            del state["mapper"]  # the concept's own weights: stored once, put back by read_training_state
            extra["training_state_mapper"] = "concept"
        extra["training_state"] = _encode_state(state, "training", tensors)
    info = {
        "format": CONCEPT_FORMAT,
        "format_version": FORMAT_VERSION,
        "backbone": concept.backbone,
        "tokens": concept.tokens,
        "super_category": concept.super_category,
        "train_band": list(concept.train_band),
        "late_stage": concept.late_stage,
        "stage_regulation": concept.stage_regulation,
        **concept.mapper.settings(),
        "steps_done": concept.steps_done,
        "config": concept.config,
        "uid": concept.uid,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "studio_version": _studio_version(),
        **extra,
    }
    return save_safetensors(tensors, metadata={METADATA_KEY: _finite_json(info, "concept")})


def _same_tensors(a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor]) -> bool:
    return a is not None and a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def save_concept(concept: Concept, path: str | Path, training_state: dict[str, Any] | None = None) -> Path:
    """Write ``concept`` (and optionally its trainer state) to ``path`` atomically (temp file +
    rename); raises :class:`ConceptFileError`."""
    path = Path(path)
    _write_atomic(path, concept_to_bytes(concept, training_state), "the concept")
    return path


def _write_atomic(path: Path, data: bytes, what: str) -> None:
    """Write into a temp file in the target folder, then rename: a failed write never leaves a
    partial file, and an older file at ``path`` stays intact."""
    if path.is_dir():
        raise ConceptFileError(f"Cannot save {what} to {path}: that is a folder. Give a file name ending in .safetensors.")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ConceptFileError(f"Cannot save {what} to {path}: the folder {folder} does not exist.")
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError as exc:
        raise ConceptFileError(_write_error_message(exc, path, what, len(data))) from None
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass


def _write_error_message(exc: OSError, path: Path, what: str, size: int) -> str:
    megabytes = f"{size / 1e6:.1f} MB"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"Not enough disk space to save {what} to {path} (it needs {megabytes}). Free some space or choose another folder."
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"No permission to write {path}. Choose a folder you can write to."
    return f"Could not save {what} to {path}: {exc.strerror or exc}."


# --------------------------------------------------------------------------- reading
_PICKLE_HINT = " Pickled files are never opened here, because loading them can run arbitrary code."


def _kind_of_bytes(head: bytes) -> str:
    kind = sniff(head)
    return kind.description if kind is not None else "some other kind of file"


def _parse_header(head: bytes, total_size: int, name: str) -> dict[str, Any]:
    """Validate the safetensors framing (8-byte length + JSON header + data) without reading data.

    ``head`` holds at least the file's first 8 + header-length bytes when they exist.
    """
    if total_size == 0:
        raise ConceptFileError(f"{name} is empty: it is not a concept file.")
    not_ours = f"{name} is not a concept file"
    if total_size < 8:
        raise ConceptFileError(f"{not_ours}: it is only {total_size} bytes long.")
    (header_len,) = struct.unpack("<Q", head[:8])
    starts_like_json = head[8:9] == b"{"
    if not starts_like_json or header_len < 2 or header_len > MAX_HEADER_BYTES:
        kind = _kind_of_bytes(head[:HEAD_BYTES])
        hint = _PICKLE_HINT if "pickle" in kind else ""
        raise ConceptFileError(
            f"{not_ours}: it looks like {kind}. Concept files are .safetensors files exported by PersonaMagic Studio.{hint}"
        )
    if 8 + header_len > total_size:
        raise ConceptFileError(f"{name} is truncated (the download or copy was cut short): export or download it again.")
    damaged = f"{name} is damaged (its safetensors header cannot be read): export it again."
    try:
        header = _strict_json(bytes(head[8 : 8 + header_len]).decode("utf-8"))
    except (_Refused, ValueError, UnicodeDecodeError):
        raise ConceptFileError(damaged) from None
    if not isinstance(header, dict):
        raise ConceptFileError(damaged)
    data_end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise ConceptFileError(f"{name} is damaged: its safetensors metadata must map names to text.")
            continue
        _check_entry(key, entry, name)
        data_end = max(data_end, entry["data_offsets"][1])
    expected = 8 + header_len + data_end
    if total_size < expected:
        raise ConceptFileError(
            f"{name} is truncated: it has {total_size:,} of {expected:,} bytes (the download or copy was cut short). "
            f"Export or download it again."
        )
    if total_size > expected:
        raise ConceptFileError(f"{name} is damaged: it has {total_size - expected:,} extra bytes after its data.")
    return header


class _Refused(ValueError):
    """A value in a concept file's JSON that no file of ours holds."""


def _refuse_constant(text: str) -> Any:
    raise _Refused(f"the number {text} is not finite")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer has {len(text)} digits")
    return int(text)


def _strict_json(text: str) -> Any:
    """json.loads without NaN / Infinity, huge integers or deep nesting (all raise _Refused)."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_int=_bounded_int)
    except RecursionError:
        raise _Refused("it is nested too deeply") from None
    if _depth(value) > MAX_METADATA_DEPTH:
        raise _Refused(f"it is nested more than {MAX_METADATA_DEPTH} levels deep")
    return value


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value (iterative: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level)
            if level <= MAX_METADATA_DEPTH:
                stack.extend((v, level + 1) for v in item)
    return deepest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_entry(key: str, entry: Any, name: str) -> None:
    """One tensor entry of a safetensors header: a known dtype, a small shape, offsets that match."""
    damaged = f"{name} is damaged: the entry for tensor {key[:60]!r} in its header is malformed."
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise ConceptFileError(damaged)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
        raise ConceptFileError(
            f"{name} holds tensor {key[:60]!r} of type {str(dtype)[:20]!r}, which concept files never use "
            f"(they hold 32-bit floats): it is not a concept exported by this studio."
        )
    if not (isinstance(shape, list) and len(shape) <= 4 and all(_is_int(d) and d >= 0 for d in shape)):
        raise ConceptFileError(damaged)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]):
        raise ConceptFileError(damaged)
    if offsets[1] - offsets[0] != _DTYPE_BYTES[dtype] * int(np.prod(shape, dtype=object)):
        raise ConceptFileError(f"{name} is damaged: tensor {key[:60]!r} has the wrong number of bytes for its shape.")


def _int_in(info: dict[str, Any], key: str, lo: int, hi: int, name: str, default: Any = ...) -> int:
    value = info.get(key, default)
    if value is ...:
        raise ConceptFileError(f"{name} is damaged: its metadata lacks {key}.")
    if not _is_int(value) or not lo <= value <= hi:
        raise ConceptFileError(
            f"{name} is damaged: its metadata says {key} = {str(value)[:40]}, but it must be a whole number "
            f"from {lo} to {hi}."
        )
    return value


def _text(info: dict[str, Any], key: str, name: str, limit: int = 200, required: bool = True) -> str | None:
    value = info.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise ConceptFileError(f"{name} is damaged: its metadata field {key} must be a short text.")
    return value


def _check_concept_metadata(info: dict[str, Any], name: str) -> None:
    """The schema of a concept's metadata: types, ranges and sizes."""
    method = info.get("method", "personamagic")
    if method not in ("personamagic", "ti"):
        raise ConceptFileError(f"{name} is damaged: its method must be personamagic or ti, got {str(method)[:40]!r}.")
    if info.get("bypass_input", "encoding") not in ("trunk", "encoding"):
        raise ConceptFileError(f"{name} is damaged: its bypass_input must be trunk or encoding.")
    if not isinstance(info.get("stage_regulation", True), bool):
        raise ConceptFileError(f"{name} is damaged: its stage_regulation must be true or false.")
    _int_in(info, "num_tokens", *MAPPER_LIMITS["num_tokens"], name)
    if method == "ti":  # one static token: no time mapper to size
        keys: tuple[str, ...] = ()
    else:
        keys = ("num_anchors", "hidden_dim", "time_encoding_dim")
    for key in keys:
        _int_in(info, key, *MAPPER_LIMITS[key], name)
    if keys and info["time_encoding_dim"] % 2:
        raise ConceptFileError(f"{name} is damaged: its time encoding width {info['time_encoding_dim']} is odd.")
    if info.get("image_embed_dim") is not None:
        _int_in(info, "image_embed_dim", *MAPPER_LIMITS["image_embed_dim"], name)
    backbone = info.get("backbone")
    if not isinstance(backbone, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, (str, bool)) or _is_int(v)) and len(str(v)) <= 500
        for k, v in backbone.items()
    ):
        raise ConceptFileError(f"{name} is damaged: its backbone metadata must be a flat mapping of short values.")
    _int_in(backbone, "token_dim", *MAPPER_LIMITS["token_dim"], name)
    band = info.get("train_band")
    if not (isinstance(band, list) and len(band) == 2 and all(_is_int(b) for b in band) and 0 <= band[0] < band[1] <= 1000):
        raise ConceptFileError(
            f"{name} is damaged: its training band must be two whole timesteps [start, end] with "
            f"0 <= start < end <= 1000, got {str(band)[:40]}."
        )
    word = _text(info, "super_category", name, limit=40)
    if " " in word.strip():
        raise ConceptFileError(f"{name} is damaged: its super-category {word[:40]!r} must be one word.")
    if info.get("late_stage") not in ("band_edge", "super_category"):
        raise ConceptFileError(f"{name} is damaged: its late stage must be band_edge or super_category.")
    _int_in(info, "steps_done", 0, 10_000_000, name, default=0)
    tokens = info.get("tokens", [])
    if not (isinstance(tokens, list) and len(tokens) <= 16 and all(isinstance(t, str) and len(t) <= 20 for t in tokens)):
        raise ConceptFileError(f"{name} is damaged: its token list is malformed.")
    if not isinstance(info.get("config", {}), dict):
        raise ConceptFileError(f"{name} is damaged: its stored settings are not a mapping.")
    for key in ("uid", "created", "studio_version", "training_state_mapper"):
        _text(info, key, name, limit=100, required=False)


def _referenced_tensors(tree: Any) -> set[str]:
    """Names of the tensors a trainer-state JSON tree refers to ({"__tensor__": name})."""
    names, stack = set(), [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("__tensor__"), str):
                names.add(item["__tensor__"])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return names


def _expected_mapper_shapes(info: dict[str, Any], token_dim: int) -> dict[str, tuple[int, ...]]:
    """``mapper.<name>`` -> shape the metadata implies; built on the meta device (no memory)."""
    with torch.device("meta"):
        mapper = build_mapper(
            torch.empty(token_dim), method=info.get("method", "personamagic"), band=tuple(info["train_band"]),
            num_tokens=int(info["num_tokens"]), num_anchors=int(info.get("num_anchors", 0)),
            hidden_dim=int(info.get("hidden_dim", 0)), time_encoding_dim=int(info.get("time_encoding_dim", 0)),
            image_embed_dim=info.get("image_embed_dim"), bypass_input=info.get("bypass_input", "encoding"),
        )
    return {f"mapper.{k}": tuple(v.shape) for k, v in mapper.state_dict().items()}


def _check_tensor_schema(header: dict[str, Any], info: dict[str, Any], name: str) -> None:
    """Every tensor's name, dtype and shape against the metadata, from the header alone: nothing
    is allocated for a file whose tensors contradict its settings, and unknown tensors are refused."""
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    state_key = "state" if info["format"] == CHECKPOINT_FORMAT else "training_state"
    state_tensors = _referenced_tensors(info.get(state_key))
    expected: dict[str, tuple[int, ...]] = {}
    if info["format"] == CONCEPT_FORMAT:
        embedding = entries.get("mapper.class_embedding")
        if embedding is None:
            raise ConceptFileError(f"{name} is damaged: the tensor mapper.class_embedding is missing.")
        shape = embedding["shape"]
        if len(shape) != 1 or not MAPPER_LIMITS["token_dim"][0] <= shape[0] <= MAPPER_LIMITS["token_dim"][1]:
            raise ConceptFileError(f"{name} is damaged: tensor mapper.class_embedding has shape {tuple(shape)}.")
        token_dim = shape[0]  # matched against the metadata's backbone in load_concept, after check_backbone
        expected = _expected_mapper_shapes(info, token_dim)
        embed_dim = info.get("image_embed_dim")
        if "image_embedding" in entries:
            expected["image_embedding"] = (embed_dim,) if embed_dim else tuple(entries["image_embedding"]["shape"][:1])
    unknown = sorted(k for k in entries if k not in expected and k not in state_tensors)
    if unknown:
        listed = ", ".join(repr(k[:40]) for k in unknown[:3]) + (" ..." if len(unknown) > 3 else "")
        raise ConceptFileError(f"{name} holds tensors a concept file never has ({listed}): it is refused unread.")
    lacking = sorted(set(expected) - set(entries))
    if lacking:
        raise ConceptFileError(f"{name} is damaged: tensors missing: {', '.join(lacking[:5])}{' ...' if len(lacking) > 5 else ''}.")
    for key, entry in entries.items():
        allowed = _MAPPER_DTYPES if key in expected else _STATE_DTYPES
        if entry["dtype"] not in allowed:
            raise ConceptFileError(
                f"{name} is damaged: tensor {key[:60]!r} holds {entry['dtype']} values, but concept files store "
                f"32-bit floats there."
            )
        if key in expected and tuple(entry["shape"]) != expected[key]:
            raise ConceptFileError(
                f"{name} is damaged: tensor {key} has shape {tuple(entry['shape'])}, but its metadata implies "
                f"{expected[key]}."
            )


def _foreign_kind(tensor_names: list[str]) -> str:
    """A guess at what a safetensors file that is not ours holds, from its tensor names."""
    joined = " ".join(tensor_names[:2000]).lower()
    if "lora" in joined:
        return "a LoRA"
    if "model.diffusion_model" in joined or "first_stage_model" in joined or "down_blocks" in joined:
        return "a Stable Diffusion model"
    if "emb_params" in joined or "string_to_param" in joined or "clip_l" in joined:
        return "a textual-inversion embedding"
    return f"another kind of safetensors file ({len(tensor_names)} tensors, e.g. {tensor_names[0]!r})" if tensor_names else "an empty safetensors file"


def _open_concept_file(
    source: str | Path | bytes | bytearray | memoryview, header_only: bool = False
) -> tuple[bytes, str, dict[str, Any]]:
    """(file bytes, display name, PersonaMagic metadata) of a file of ours, else a :class:`ConceptFileError`.

    A path is judged by its header before the rest is read: a 4 GB checkpoint dropped by
    mistake is refused without reading it whole. ``header_only``: stop there (the bytes are b"").
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), "The uploaded file"
        return data, name, _check_ours(_parse_header(data, len(data), name), name)
    path = Path(source)
    name = path.name
    if not path.is_file():
        raise ConceptFileError(f"File not found: {path}")
    try:
        with path.open("rb") as handle:
            total = os.fstat(handle.fileno()).st_size
            head = handle.read(8)
            if len(head) == 8:
                (header_len,) = struct.unpack("<Q", head)
                head += handle.read(header_len if header_len <= MAX_HEADER_BYTES else 64)
            info = _check_ours(_parse_header(head, total, name), name)
            if header_only:
                return b"", name, info
            handle.seek(0)
            data = handle.read()
    except OSError as exc:
        raise ConceptFileError(f"Could not read {path}: {exc.strerror or exc}.") from None
    if len(data) != total:
        raise ConceptFileError(f"{name} changed while it was being read; try again.")
    return data, name, info


def _check_ours(header: dict[str, Any], name: str) -> dict[str, Any]:
    """The PersonaMagic metadata of a safetensors header, or a :class:`ConceptFileError`."""
    metadata = header.get("__metadata__") or {}
    tensor_names = [k for k in header if k != "__metadata__"]
    if METADATA_KEY not in metadata:
        raise ConceptFileError(
            f"{name} is a safetensors file but not a PersonaMagic concept: it looks like {_foreign_kind(tensor_names)}. "
            f"Import a concept exported by this studio."
        )
    text = metadata[METADATA_KEY]
    if len(text) > MAX_METADATA_BYTES:  # checked before parsing: a huge JSON costs GBs and seconds
        raise ConceptFileError(
            f"{name} is not a concept exported by this studio: its metadata is {len(text) / 1e6:.0f} MB "
            f"(the limit is {MAX_METADATA_BYTES / 1e6:.0f} MB)."
        )
    try:
        info = _strict_json(text)
    except _Refused as exc:
        raise ConceptFileError(f"{name} is damaged: its PersonaMagic metadata is refused ({exc}).") from None
    except ValueError:
        raise ConceptFileError(f"{name} is damaged: its PersonaMagic metadata is not valid JSON.") from None
    if not isinstance(info, dict) or info.get("format") not in (CONCEPT_FORMAT, CHECKPOINT_FORMAT):
        raise ConceptFileError(f"{name} is not a PersonaMagic concept (unknown format {info.get('format') if isinstance(info, dict) else info!r}).")
    version = info.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ConceptFileError(f"{name} has an invalid format version {version!r}.")
    if version > FORMAT_VERSION:
        raise ConceptFileError(
            f"{name} was made by a newer PersonaMagic Studio (file format version {version}); this studio reads "
            f"version {FORMAT_VERSION}. Update the studio to open it."
        )
    if info["format"] == CONCEPT_FORMAT:
        _check_concept_metadata(info, name)
    _check_tensor_schema(header, info, name)
    return info


def _backbone_text(fingerprint: dict[str, Any]) -> str:
    return f"{fingerprint.get('source', '?')} (width {fingerprint.get('token_dim', '?')})"


def check_backbone(fingerprint: dict[str, Any], backbone: Backbone) -> str | None:
    """Raise :class:`ConceptFileError` when a concept cannot run on ``backbone``; else a warning or None.

    A different width or vocabulary cannot work; the same width from another source (e.g. a
    fine-tune of SD 1.5) runs, but the likeness may suffer.
    """
    mine = backbone.fingerprint()
    if fingerprint.get("token_dim") != mine["token_dim"] or fingerprint.get("vocab_size") != mine["vocab_size"]:
        raise ConceptFileError(
            f"This concept was trained on {_backbone_text(fingerprint)}, and this studio runs {_backbone_text(mine)}: "
            f"their text encoders differ, so it cannot be used here. Switch to the model it was trained on."
        )
    # the same weights by folder, file or hub id share a model_id; older concepts have only the source
    same = fingerprint.get("model_id") == mine["model_id"] if fingerprint.get("model_id") else fingerprint.get("source") == mine["source"]
    if not same or fingerprint.get("text_layers") != mine["text_layers"]:
        return (
            f"This concept was trained on {fingerprint.get('source')!r} and is used with {mine['source']!r}: "
            f"the text encoders have the same width, so it runs, but the likeness may be weaker."
        )
    return None


def compatibility_warning(concept: Concept, backbone: Backbone) -> str | None:
    """A sentence when ``concept`` runs on ``backbone`` only approximately (see :func:`check_backbone`)."""
    return check_backbone(concept.backbone, backbone)


def _tensors(data: bytes, name: str) -> dict[str, torch.Tensor]:
    """The file's tensors (its header already passed :func:`_check_tensor_schema`); every
    floating-point value must be finite."""
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ConceptFileError(f"{name} is damaged: its tensors cannot be read ({exc}).") from None
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ConceptFileError(
                f"{name} is damaged: tensor {key} holds values that are not finite numbers (NaN or infinity), "
                f"so it would render black or noisy images. Export the concept again."
            )
    return tensors


def load_concept(source: str | Path | bytes, backbone: Backbone | None = None) -> Concept:
    """Read a concept file (path or bytes) with safetensors only; never unpickles.

    With ``backbone``, also checks that the concept fits it (see :func:`check_backbone`) and
    puts the mapper on its device. Every problem is a :class:`ConceptFileError` with a sentence.
    """
    data, name, info = _open_concept_file(source)
    if info["format"] != CONCEPT_FORMAT:
        raise ConceptFileError(f"{name} is a PersonaMagic training checkpoint, not a concept: use it to resume training.")
    required = ["backbone", "super_category", "train_band", "late_stage", "num_tokens"]
    method = info.get("method", "personamagic")
    if method == "personamagic":
        required += ["num_anchors", "hidden_dim", "time_encoding_dim"]
    missing = [key for key in required if key not in info]
    if missing:
        raise ConceptFileError(f"{name} is damaged: its metadata lacks {', '.join(missing)}.")
    if not isinstance(info["backbone"], dict) or not isinstance(info["train_band"], list) or len(info["train_band"]) != 2:
        raise ConceptFileError(f"{name} is damaged: its backbone or band metadata is malformed.")
    if backbone is not None:
        check_backbone(info["backbone"], backbone)
        from studio.conditioning import super_category_id

        try:
            super_category_id(backbone.tokenizer, info["super_category"])
        except ValueError as exc:
            raise ConceptFileError(f"{name} cannot be used: {exc}") from None
    tensors = _tensors(data, name)
    width = tensors["mapper.class_embedding"].shape[0]  # present and 1-D: see _check_tensor_schema
    if width != info["backbone"]["token_dim"]:
        raise ConceptFileError(
            f"{name} is damaged: its tensors are {width} wide, but its metadata says the text encoder is "
            f"{info['backbone']['token_dim']} wide."
        )
    try:
        mapper = build_mapper(
            tensors["mapper.class_embedding"],
            method=method,
            band=tuple(info["train_band"]),
            num_tokens=int(info["num_tokens"]),
            num_anchors=int(info.get("num_anchors", 0)),
            hidden_dim=int(info.get("hidden_dim", 0)),
            time_encoding_dim=int(info.get("time_encoding_dim", 0)),
            image_embed_dim=info.get("image_embed_dim"),
            # Files from before the wiring was recorded used the separate branch on the encoding.
            bypass_input=info.get("bypass_input", "encoding"),
        )
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ConceptFileError(f"{name} is damaged: its mapper settings are invalid ({exc}).") from None
    expected = {f"mapper.{k}": v.shape for k, v in mapper.state_dict().items()}
    present = {k: v for k, v in tensors.items() if k.startswith("mapper.")}
    lacking = sorted(set(expected) - set(present))
    if lacking:
        raise ConceptFileError(f"{name} is damaged: tensors missing: {', '.join(lacking[:5])}{' ...' if len(lacking) > 5 else ''}.")
    unexpected = sorted(set(present) - set(expected))
    if unexpected:
        raise ConceptFileError(f"{name} does not match its own settings: unexpected tensors {', '.join(unexpected[:5])}.")
    for key, shape in expected.items():
        if present[key].shape != shape:
            raise ConceptFileError(
                f"{name} is damaged: tensor {key} has shape {tuple(present[key].shape)}, expected {tuple(shape)}."
            )
    mapper.load_state_dict({k.removeprefix("mapper."): v for k, v in present.items()})
    image_embedding = tensors.get("image_embedding")
    embed_dim = mapper.image_embed_dim
    if image_embedding is not None and embed_dim is not None and tuple(image_embedding.shape) != (embed_dim,):
        raise ConceptFileError(
            f"{name} is damaged: its image embedding has shape {tuple(image_embedding.shape)}, expected ({embed_dim},)."
        )
    device = backbone.device if backbone is not None else torch.device("cpu")
    mapper = mapper.to(device).eval().requires_grad_(False)
    try:
        return Concept(
            mapper=mapper,
            super_category=str(info["super_category"]),
            train_band=(int(info["train_band"][0]), int(info["train_band"][1])),
            late_stage=str(info["late_stage"]),
            backbone=dict(info["backbone"]),
            image_embedding=None if image_embedding is None else image_embedding.to(device),
            steps_done=int(info.get("steps_done", 0)),
            config=_stored_settings(info.get("config")),
            stage_regulation=bool(info.get("stage_regulation", True)),
            # Same file -> same uid, so a re-imported concept reuses cached text conditions.
            uid=hashlib.sha256(data).hexdigest()[:32],
        )
    except (TypeError, ValueError) as exc:
        raise ConceptFileError(f"{name} is damaged: its metadata has a value of the wrong kind ({exc}).") from None


# Stored settings that name what to load (model sources, CLIP, image encoder, face models): a
# file never decides those; the server's own settings do.
_LOADER_SECTIONS = ("model", "face", "metrics")


def _stored_settings(config: Any) -> dict[str, Any]:
    """The training settings a concept file carries, as data: without the sections that name
    things to load (see :data:`_LOADER_SECTIONS`)."""
    return {k: v for k, v in (config or {}).items() if k not in _LOADER_SECTIONS}


def read_training_state(source: str | Path | bytes) -> dict[str, Any] | None:
    """The trainer state a concept file carries (CPU tensors), or None when it has none."""
    data, name, info = _open_concept_file(source)
    if info["format"] != CONCEPT_FORMAT or "training_state" not in info:
        return None
    tensors = _tensors(data, name)
    try:
        state = _decode_state(info["training_state"], tensors)
        if info.get("training_state_mapper") == "concept":
            state["mapper"] = {k.removeprefix("mapper."): v for k, v in tensors.items() if k.startswith("mapper.")}
        return state
    except (KeyError, TypeError, ValueError) as exc:
        raise ConceptFileError(f"{name} is damaged: its training state cannot be rebuilt ({exc}).") from None


def load_training_state(source: str | Path | bytes) -> dict[str, Any]:
    """A trainer state from a training checkpoint or from a concept file that carries one."""
    data, name, info = _open_concept_file(source)
    state = load_checkpoint(data) if info["format"] == CHECKPOINT_FORMAT else read_training_state(data)
    if state is None:
        raise ConceptFileError(
            f"{name} is a concept without a training state (it was saved while training ran, or by an older "
            f"studio): training cannot go on from it. Use a checkpoint, or a concept saved after training ended."
        )
    if not (isinstance(state, dict) and isinstance(state.get("step"), int)):
        raise ConceptFileError(f"{name} is damaged: its training state has no step count.")
    return state


def read_concept_info(source: str | Path | bytes) -> dict[str, Any]:
    """The JSON metadata of a concept file, from its header alone (the tensors are not read)."""
    return _open_concept_file(source, header_only=True)[2]


# =========================================================================== training checkpoints
# A trainer state (nested dicts / lists / tuples of tensors, numbers, strings and numpy RNG
# arrays) is stored as safetensors tensors named by their dotted path, plus a JSON tree in
# the metadata in which each tensor is {"__tensor__": name}. JSON has no tuples and only str
# keys, so tuples and dicts with other keys are tagged; loading restores the exact types.
def _encode_state(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        name = path or "tensor"
        while name in tensors:
            name += "_"
        tensors[name] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": name}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [_encode_state(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode_state(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        prefix = f"{path}." if path else ""
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode_state(v, f"{prefix}{k}", tensors) for k, v in value.items()}
        return {"__dict__": [[_encode_state(k, "", {}), _encode_state(v, f"{prefix}{k}", tensors)] for k, v in value.items()]}
    raise ConceptFileError(f"cannot store a {type(value).__name__} at {path!r} in a training checkpoint")


def _decode_state(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode_state(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return np.asarray(value["__ndarray__"], dtype=value["dtype"])
    if "__dtype__" in value:
        return getattr(torch, value["__dtype__"])
    if "__tuple__" in value:
        return tuple(_decode_state(v, tensors) for v in value["__tuple__"])
    if "__dict__" in value:
        return {_hashable(_decode_state(k, tensors)): _decode_state(v, tensors) for k, v in value["__dict__"]}
    return {k: _decode_state(v, tensors) for k, v in value.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def checkpoint_to_bytes(trainer_state: dict[str, Any]) -> bytes:
    """A trainer's state_dict() as safetensors bytes (tensors + JSON metadata, no pickle)."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode_state(trainer_state, "", tensors)
    info = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "state": tree,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "studio_version": _studio_version(),
    }
    return save_safetensors(tensors, metadata={METADATA_KEY: _finite_json(info, "training checkpoint")})


def _finite_json(info: dict[str, Any], what: str) -> str:
    """JSON for a file's metadata; NaN / infinity are refused (readers refuse them too)."""
    try:
        return json.dumps(info, default=str, allow_nan=False)
    except ValueError:
        raise ConceptFileError(f"Cannot save the {what}: one of its settings is not a finite number.") from None


def save_checkpoint(path: str | Path, trainer_state: dict[str, Any]) -> Path:
    """Write a trainer state (optimiser, RNG states, step, ...) atomically to ``path``."""
    path = Path(path)
    _write_atomic(path, checkpoint_to_bytes(trainer_state), "the training checkpoint")
    return path


def load_checkpoint(source: str | Path | bytes) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; tensors come back on the CPU."""
    data, name, info = _open_concept_file(source)
    if info["format"] != CHECKPOINT_FORMAT:
        raise ConceptFileError(f"{name} is a concept, not a training checkpoint: import it as a concept instead.")
    tensors = _tensors(data, name)
    try:
        return _decode_state(info["state"], tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConceptFileError(f"{name} is damaged: its state cannot be rebuilt ({exc}).") from None
