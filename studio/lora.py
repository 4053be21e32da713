"""Style LoRAs on the shared base model, per call (docs/EXPORT.md, "Style LoRAs").

Files are read as safetensors only (never unpickled), sized before they are read, and parsed
by diffusers' LoRA loader (``lora_state_dict``: kohya/A1111 and diffusers layouts) into
per-layer low-rank pairs (A, B) with their alpha. They are checked against the backbone's
layers: a LoRA made for another base (SDXL, SD 2) is refused with a sentence.

The backbone is shared by every session, so a LoRA is never fused into it nor left active on
it. Forward hooks are installed once on the layers a LoRA touches and read the LoRAs to apply
from a ``contextvars`` variable, as the attention hooks do (studio/attention.py): inside
``with applied(loras):`` this thread's calls see ``W x + strength * (alpha / r) * B A x``,
every other thread (session) sees the plain weights at the same moment.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import struct
import threading
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from studio.errors import StudioError

if TYPE_CHECKING:
    from studio.backbone import Backbone

MAX_LORA_BYTES = 1_500_000_000  # SD 1.x LoRAs are 1-300 MB; a full checkpoint is not a LoRA
MAX_HEADER_BYTES = 16_000_000
MAX_LORAS = 4
STRENGTH_RANGE = (-2.0, 2.0)
_PARTS = ("unet", "text_encoder")


class LoraFileError(StudioError, ValueError):
    """A LoRA file cannot be used; the message says why and what to do."""


@dataclass(frozen=True, eq=False)
class LoraLayer:
    """One adapted layer: down (r, in[, kh, kw]) and up (out, r[, 1, 1]); scale = alpha / r."""

    part: str  # "unet" or "text_encoder"
    module: str  # the layer's name in that part
    down: torch.Tensor
    up: torch.Tensor
    scale: float


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """A checked LoRA file: its layers and where it came from (name, sha256)."""

    name: str
    sha256: str
    layers: tuple[LoraLayer, ...] = field(repr=False)

    @property
    def touches_text_encoder(self) -> bool:
        return any(layer.part == "text_encoder" for layer in self.layers)


@dataclass(frozen=True)
class LoraUse:
    """A LoRA and its strength for one call (0 = off, exactly)."""

    weights: LoraWeights
    strength: float = 1.0

    def record(self) -> dict[str, Any]:
        """What generation settings store: enough to say which file and how strong."""
        return {"name": self.weights.name, "sha256": self.weights.sha256, "strength": self.strength}


# --------------------------------------------------------------------------- reading
def _read_checked(source: str | Path | bytes, name: str) -> tuple[dict[str, torch.Tensor], bytes]:
    """Bytes of a safetensors file, refused with a sentence when it is anything else."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise LoraFileError(f"There is no LoRA file at {path}.")
        size = path.stat().st_size
        if size > MAX_LORA_BYTES:
            raise LoraFileError(
                f"{name} is {size / 1e9:.1f} GB: too large for a LoRA (at most {MAX_LORA_BYTES / 1e9:.1f} GB). "
                f"A full model checkpoint is not a LoRA."
            )
        data = path.read_bytes()
    else:
        data = bytes(source)
        if len(data) > MAX_LORA_BYTES:
            raise LoraFileError(f"{name} is too large for a LoRA (at most {MAX_LORA_BYTES / 1e9:.1f} GB).")
    from studio.concept_file import _PICKLE_HINT, _kind_of_bytes

    header_len = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else 0
    if len(data) < 10 or data[8:9] != b"{" or not 2 <= header_len <= min(MAX_HEADER_BYTES, len(data) - 8):
        kind = _kind_of_bytes(data[:64]) if data else "an empty file"
        hint = _PICKLE_HINT if "pickle" in kind or "zip" in kind else ""
        raise LoraFileError(f"{name} is not a LoRA: it looks like {kind}. LoRAs are accepted as .safetensors files only.{hint}")
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, UnicodeDecodeError):
        raise LoraFileError(f"{name} is damaged or truncated (its safetensors data cannot be read). Download it again.") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if isinstance(metadata, dict) and metadata.get("format") == "textual-inversion" or list(tensors) == ["emb_params"]:
        raise LoraFileError(f"{name} is a textual-inversion embedding, not a LoRA: use it in the prompt, not as a style LoRA.")
    return tensors, data


def _to_peft_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' old and new LoRA key layouts -> '<module>.lora_A.weight' / '.lora_B.weight'."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    unet = {k: v for k, v in state.items() if k.startswith("unet.")}
    text = {k: v for k, v in state.items() if k.startswith("text_encoder.")}
    out = dict(convert_unet_state_dict_to_peft(unet)) if unet else {}
    if text:
        try:
            out.update(convert_state_dict_to_peft(text))
        except ValueError:  # already in the peft layout
            out.update(text)
    out.update({k: v for k, v in state.items() if not k.startswith(("unet.", "text_encoder."))})
    return out


def _alpha_names(alphas: dict[str, float] | None) -> dict[str, float]:
    """network alphas keyed like the converted weights' lora_A keys (minus '.lora_A.weight')."""
    if not alphas:
        return {}
    named = {}
    for key, alpha in alphas.items():  # one by one: the converter may reorder keys
        (renamed,) = _to_peft_names({key.removesuffix(".alpha"): torch.zeros(())})
        named[renamed.removesuffix(".lora_A.weight")] = float(alpha)
    return named


def _module(part: torch.nn.Module, name: str) -> torch.nn.Module | None:
    """The layer ``name`` of ``part`` (text-encoder names may omit the leading 'text_model.')."""
    for candidate in (name, f"text_model.{name}"):
        try:
            return part.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def load_lora(source: str | Path | bytes, backbone: Backbone, name: str | None = None) -> LoraWeights:
    """Read and check a LoRA file for ``backbone``; raises :class:`LoraFileError` with a sentence."""
    from diffusers import StableDiffusionPipeline

    name = name or (Path(source).name if isinstance(source, (str, Path)) else "the LoRA file")
    if isinstance(source, (str, Path)) and Path(source).suffix.lower() != ".safetensors":
        raise LoraFileError(
            f"{name} is not a .safetensors file. LoRAs are accepted as .safetensors only: .ckpt/.pt/.bin files are "
            f"pickles, which can run code when opened."
        )
    tensors, data = _read_checked(source, name)
    try:
        state, alphas = StableDiffusionPipeline.lora_state_dict(dict(tensors))
    except Exception as exc:  # diffusers' converter raises plain errors on layouts it does not know
        raise LoraFileError(f"{name} is not a LoRA diffusers can read ({exc}).") from None
    peft = _to_peft_names(state)
    alpha_of = _alpha_names(alphas)
    downs = {k.removesuffix(".lora_A.weight"): v for k, v in peft.items() if k.endswith(".lora_A.weight")}
    if not downs:
        raise LoraFileError(f"{name} is not a LoRA: it holds no low-rank layer pairs (lora_down/lora_up or lora_A/lora_B).")
    parts = {"unet": backbone.unet, "text_encoder": backbone.text_encoder}
    layers = []
    for key, down in sorted(downs.items()):
        part_name, _, module_name = key.partition(".")
        up = peft.get(f"{key}.lora_B.weight")
        module = _module(parts[part_name], module_name) if part_name in parts else None
        if up is None or module is None or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            raise LoraFileError(
                f"{name} was made for another base model: it adapts a layer '{key}' that {backbone.describe()} does not have "
                f"(an SDXL or SD 2 LoRA does not fit SD 1.x)."
            )
        weight = module.weight
        if down.shape[1] != weight.shape[1] or up.shape[0] != weight.shape[0] or up.shape[1] != down.shape[0]:
            raise LoraFileError(
                f"{name} was made for another base model: its layer '{key}' maps {down.shape[1]} -> {up.shape[0]} features, "
                f"but this model's maps {weight.shape[1]} -> {weight.shape[0]} (an SDXL or SD 2 LoRA does not fit SD 1.x)."
            )
        if isinstance(module, torch.nn.Conv2d) and down.ndim == 2:  # a linear pair on a 1x1 convolution
            down, up = down[:, :, None, None], up[:, :, None, None]
        rank = down.shape[0]
        alpha = alpha_of.get(key, float(rank))
        layers.append(LoraLayer(part_name, module_name, down.float(), up.float(), alpha / rank))
    return LoraWeights(name=name, sha256=hashlib.sha256(data).hexdigest(), layers=tuple(layers))


def parse_lora_argument(text: str) -> tuple[str, float]:
    """``FILE[:STRENGTH]`` -> (file, strength); strength defaults to 1."""
    path, sep, tail = text.rpartition(":")
    try:
        strength = float(tail) if sep and path else None
    except ValueError:
        strength = None
    return (text, 1.0) if strength is None else (path, check_strength(strength))


def uses_from_arguments(arguments: Sequence[str], backbone: Backbone) -> list[LoraUse]:
    """``["ink.safetensors:0.6", ...]`` (the CLI's --lora) -> checked LoRAs with strengths."""
    if len(arguments) > MAX_LORAS:
        raise LoraFileError(f"At most {MAX_LORAS} LoRAs at once, got {len(arguments)}.")
    uses = []
    for argument in arguments:
        path, strength = parse_lora_argument(argument)
        uses.append(LoraUse(load_lora(path, backbone), strength))
    return uses


def check_strength(strength: float) -> float:
    lo, hi = STRENGTH_RANGE
    if not isinstance(strength, (int, float)) or not lo <= float(strength) <= hi:
        raise LoraFileError(f"A LoRA strength must be a number from {lo:g} to {hi:g}, got {strength!r}.")
    return float(strength)


# --------------------------------------------------------------------------- applying, per call
_ACTIVE: ContextVar[dict[int, list[tuple[torch.Tensor, torch.Tensor, float]]] | None] = ContextVar("studio_loras", default=None)
_RECORDS: ContextVar[tuple[dict[str, Any], ...]] = ContextVar("studio_lora_records", default=())
_TEXT_KEY: ContextVar[tuple] = ContextVar("studio_lora_text_key", default=())
_INSTALL_LOCK = threading.Lock()


def _lora_hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
    active = _ACTIVE.get()
    pairs = active.get(id(module)) if active else None
    if not pairs:
        return None
    x = inputs[0]
    for down, up, scale in pairs:
        if isinstance(module, torch.nn.Conv2d):
            hidden = F.conv2d(x, down.to(x.dtype), stride=module.stride, padding=module.padding, dilation=module.dilation)
            output = output + scale * F.conv2d(hidden, up.to(x.dtype))
        else:
            output = output + scale * F.linear(F.linear(x, down.to(x.dtype)), up.to(x.dtype))
    return output


def _install(module: torch.nn.Module) -> None:
    """Hook ``module`` once (the hook is inert outside :func:`applied`)."""
    with _INSTALL_LOCK:
        if not getattr(module, "_studio_lora_hooked", False):
            module.register_forward_hook(_lora_hook)
            module._studio_lora_hooked = True


@contextlib.contextmanager
def applied(backbone: Backbone, uses: Sequence[LoraUse]) -> Iterator[None]:
    """Within this block, this thread's UNet and text-encoder calls see ``uses``; nobody else does.

    Strength 0 adds nothing at all, so it gives exactly the images without the LoRA.
    """
    if len(uses) > MAX_LORAS:
        raise LoraFileError(f"At most {MAX_LORAS} LoRAs at once, got {len(uses)}.")
    parts = {"unet": backbone.unet, "text_encoder": backbone.text_encoder}
    device, dtype = backbone.device, backbone.dtype
    active: dict[int, list] = {}
    text_key = []
    for use in uses:
        strength = check_strength(use.strength)
        if strength == 0.0:
            continue
        for layer in use.weights.layers:
            module = _module(parts[layer.part], layer.module)
            _install(module)
            active.setdefault(id(module), []).append(
                (layer.down.to(device=device, dtype=dtype), layer.up.to(device=device, dtype=dtype), strength * layer.scale)
            )
        if use.weights.touches_text_encoder:
            text_key.append((use.weights.sha256, strength))
    tokens = (
        _ACTIVE.set(active or None),
        _RECORDS.set(tuple(use.record() for use in uses)),
        _TEXT_KEY.set(tuple(text_key)),
    )
    try:
        yield
    finally:
        _ACTIVE.reset(tokens[0])
        _RECORDS.reset(tokens[1])
        _TEXT_KEY.reset(tokens[2])


def active_records() -> list[dict[str, Any]]:
    """The LoRAs (name, sha256, strength) this thread's calls use now: what a generation records."""
    return list(_RECORDS.get())


def text_encoder_key() -> tuple:
    """A key that changes with the LoRAs acting on the text encoder (for text-condition caches)."""
    return _TEXT_KEY.get()


__all__ = [
    "LoraFileError", "LoraLayer", "LoraUse", "LoraWeights", "active_records", "applied", "check_strength",
    "load_lora", "parse_lora_argument", "text_encoder_key", "uses_from_arguments",
]
