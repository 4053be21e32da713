"""Concept files are data, never configuration: no interpolation of stored settings,
a strict schema checked from the header before any tensor is read, finite values, stored
names of things to load ignored, a failed import that keeps the session's concept, and a
seeded fuzz over malformed concept files and images."""
from __future__ import annotations

import io
import json
import random
import struct
import threading
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_safetensors

from studio import concept_file as concept_module
from studio.concept_file import ConceptFileError, concept_to_bytes, load_concept, read_concept_info
from studio.config import FaceConfig, config_from_dict
from studio.engine import Engine, Phase
from test_sampler import make_concept

TIMEOUT = 300
SECRET_VAR = "STUDIO_TEST_SECRET_16"
SECRET = "hunter2-do-not-leak"


@pytest.fixture(scope="module")
def good(backbone) -> bytes:
    return concept_to_bytes(make_concept(backbone, seed=4, bypass=True))


def _split(data: bytes) -> tuple[dict, dict]:
    """(safetensors header, PersonaMagic metadata) of a concept file."""
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    return header, json.loads(header["__metadata__"]["personamagic"])


def _with_metadata_text(data: bytes, text: str) -> bytes:
    return save_safetensors(load_tensors(data), metadata={"personamagic": text})


def _with_info(data: bytes, edit) -> bytes:
    _, info = _split(data)
    edit(info)
    return _with_metadata_text(data, json.dumps(info))


def _with_header(data: bytes, edit) -> bytes:
    """A copy whose raw safetensors header JSON went through ``edit(dict)`` (data bytes kept)."""
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    edit(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + header_len :]


# --------------------------------------------------------------------------- no interpolation
def test_settings_are_never_interpolated(monkeypatch):
    monkeypatch.setenv(SECRET_VAR, SECRET)
    text = f"${{oc.env:{SECRET_VAR}}}"
    cfg = config_from_dict({"description": text, "sample": {"negative_prompt": "x " + text}},
                           {"sample.preview_prompts": ["{} " + text]})
    assert cfg.description == text and cfg.sample.negative_prompt == "x " + text
    assert cfg.sample.preview_prompts == ["{} " + text]
    assert SECRET not in json.dumps(cfg.to_dict())


def test_an_imported_concept_never_leaks_the_servers_environment(engine_cfg, face_photo, monkeypatch, tmp_path):
    """Stored config with ${oc.env:...} -> import -> Train more -> export: the value never appears,
    and what the file names to load (model, CLIP, face models) is the server's own setting."""
    monkeypatch.setenv(SECRET_VAR, SECRET)
    leak = f"${{oc.env:{SECRET_VAR}}}"
    first = Engine(engine_cfg.replace(**{"train.steps": 2, "train.preview_every": 0}), session_id="leak-first")
    second = Engine(engine_cfg, session_id="leak-second")
    try:
        first.prepare_photos([face_photo])
        first.start()
        first.wait_until(lambda s: not s.active, timeout=TIMEOUT)
        exported = first.export_concept(tmp_path / "two.safetensors").read_bytes()

        def poison(info):
            config = info["config"]
            config["description"] = leak
            config["sample"]["negative_prompt"] = "ugly, " + leak
            config["model"]["source"] = leak
            config["model"]["image_encoder"] = "/tmp/evil-encoder"
            config["metrics"]["clip_model"] = "/tmp/evil-clip"
            config["face"]["insightface_root"] = "/tmp/evil-faces"

        poisoned = tmp_path / "poisoned.safetensors"
        poisoned.write_bytes(_with_info(exported, poison))
        second.prepare_photos([face_photo])
        concept = second.import_concept(str(poisoned))
        assert SECRET not in json.dumps(concept.config)
        assert "model" not in concept.config and "metrics" not in concept.config and "face" not in concept.config
        second.continue_training(1)
        done = second.wait_until(lambda s: not s.active, timeout=TIMEOUT)
        assert done.phase is Phase.FINISHED, done.message
        out = second.export_concept(tmp_path / "after.safetensors").read_bytes()
        assert SECRET.encode() not in out
        _, info = _split(out)
        assert info["config"]["description"] == leak  # kept as the literal text it was
        assert info["config"]["model"] == engine_cfg.to_dict()["model"]
        assert info["config"]["metrics"] == engine_cfg.to_dict()["metrics"]
        assert info["config"]["face"] == engine_cfg.to_dict()["face"]
    finally:
        first.close()
        second.close()


# --------------------------------------------------------------------------- schema
@pytest.mark.parametrize("edit, match", [
    (lambda i: i.update(num_anchors=10**9), "num_anchors = 1000000000, but it must be a whole number from 1 to 4096"),
    (lambda i: i.update(hidden_dim=[16]), "hidden_dim = \\[16\\], but it must be a whole number"),
    (lambda i: i.update(train_band=500), "training band must be two whole timesteps"),
    (lambda i: i.update(tokens="<id1>"), "token list is malformed"),
    (lambda i: i.update(backbone="tiny"), "backbone metadata must be a flat mapping"),
    (lambda i: i.update(super_category="a b"), "must be one word"),
    (lambda i: i.update(config=[1, 2]), "stored settings are not a mapping"),
    (lambda i: i.update(time_encoding_dim=33), "is odd"),
    (lambda i: i.update(steps_done=True), "steps_done = True"),
])
def test_metadata_schema_refuses_with_a_sentence(backbone, good, edit, match):
    with pytest.raises(ConceptFileError, match=match):
        load_concept(_with_info(good, edit), backbone)


@pytest.mark.parametrize("text, match", [
    ('{"format": "personamagic-studio-concept", "format_version": NaN}', "Infinity|NaN is not finite"),
    ('{"format": "personamagic-studio-concept", "format_version": 1, "x": Infinity}', "Infinity is not finite"),
    ('{"format": "personamagic-studio-concept", "format_version": 1' + "0" * 500 + "}", "digits"),
    ('[' * 5000 + ']' * 5000, "nested"),
    ('{"a":' * 40 + "1" + "}" * 40, "nested more than"),
    ("not json", "not valid JSON"),
])
def test_malformed_metadata_json_gets_one_sentence(backbone, good, text, match):
    with pytest.raises(ConceptFileError, match=match):
        load_concept(_with_metadata_text(good, text), backbone)


@pytest.mark.parametrize("edit, match", [
    (lambda h: h.update(__metadata__={"personamagic": {"format": 1}}), "metadata must map names to text"),
    (lambda h: h.update(__metadata__=["personamagic"]), "metadata must map names to text"),
    (lambda h: h["mapper.head.bias"].update(dtype="F8_E4M3"), "of type 'F8_E4M3', which concept files never use"),
    (lambda h: h["mapper.head.bias"].update(dtype="I32"), "holds I32 values, but concept files store 32-bit floats"),
    (lambda h: h["mapper.head.bias"].update(shape=7), "header is malformed"),
    (lambda h: h["mapper.head.bias"].update(data_offsets=[0, 1e400]), "cannot be read"),
    (lambda h: h["mapper.head.bias"].update(data_offsets=[0, 10**30]), "cannot be read"),
])
def test_malformed_headers_get_one_sentence(backbone, good, edit, match):
    with pytest.raises(ConceptFileError, match=match):
        load_concept(_with_header(good, edit), backbone)


def test_shapes_and_unknown_tensors_are_refused_before_any_tensor_is_read(backbone, good, monkeypatch):
    def never(*_args, **_kwargs):
        raise AssertionError("tensors were read before the header was checked")

    monkeypatch.setattr(concept_module, "load_safetensors", never)
    tensors = load_tensors(good)
    _, info = _split(good)
    metadata = {"personamagic": json.dumps(info)}
    extra = save_safetensors({**tensors, "payload": torch.zeros(4)}, metadata=metadata)
    with pytest.raises(ConceptFileError, match="holds tensors a concept file never has \\('payload'\\)"):
        load_concept(extra, backbone)
    wider = dict(tensors, **{"mapper.head.bias": torch.zeros(5)})
    with pytest.raises(ConceptFileError, match="tensor mapper.head.bias has shape \\(5,\\), but its metadata implies"):
        load_concept(save_safetensors(wider, metadata=metadata), backbone)
    huge = json.dumps({**info, "num_anchors": 4096, "time_encoding_dim": 8192})
    with pytest.raises(ConceptFileError, match=r"tensor mapper.anchors.\w+ has shape"):
        load_concept(save_safetensors(tensors, metadata={"personamagic": huge}), backbone)
    assert read_concept_info(good)["num_tokens"] == 2  # the header alone passes


def test_non_finite_weights_and_multi_token_words_are_refused(backbone, good):
    tensors = load_tensors(good)
    _, info = _split(good)
    metadata = {"personamagic": json.dumps(info)}
    for bad in (float("nan"), float("inf")):
        broken = dict(tensors, **{"mapper.head.weight": torch.full_like(tensors["mapper.head.weight"], bad)})
        with pytest.raises(ConceptFileError, match="not finite numbers"):
            load_concept(save_safetensors(broken, metadata=metadata), backbone)
    with pytest.raises(ConceptFileError, match="cannot be used: The super-category 'xqzvbnmwq' is"):
        load_concept(_with_info(good, lambda i: i.update(super_category="xqzvbnmwq")), backbone)


def test_metadata_size_is_checked_before_parsing(backbone, good, monkeypatch):
    parsed = []
    monkeypatch.setattr(concept_module.json, "loads", lambda *a, **k: parsed.append(1) or {})
    text = json.dumps({"format": "personamagic-studio-concept", "pad": "x" * (concept_module.MAX_METADATA_BYTES + 10)})
    data = _with_metadata_text(good, text)
    monkeypatch.setattr(concept_module, "MAX_HEADER_BYTES", 10 * concept_module.MAX_METADATA_BYTES)
    parsed.clear()
    with pytest.raises(ConceptFileError, match="its metadata is 4 MB"):
        concept_module._check_ours({"__metadata__": {"personamagic": text}}, "big.safetensors")
    assert not parsed
    assert data  # built without error


# --------------------------------------------------------------------------- the session's concept stays
@pytest.fixture(scope="module")
def engine_cfg(tiny_cfg):
    return tiny_cfg.replace(**{"train.steps": 3, "train.preview_every": 0})


@pytest.fixture(scope="module")
def face_photo(faces_dir):
    return str(faces_dir / "single" / "f2d_0.jpg")


@pytest.fixture(scope="module")
def importing(engine_cfg, backbone, good):
    engine = Engine(engine_cfg, session_id="import-keeps")
    engine.import_concept(good)
    yield engine
    engine.close()


def _malformed_concepts(good: bytes, count: int, seed: int = 16):
    """Seeded malformed concept files: byte flips, truncations, header and metadata edits."""
    rng = random.Random(seed)
    header, info = _split(good)
    tensors = load_tensors(good)
    values = [None, True, -1, 0, 2**64, 1e308, -1e308, "", "x" * 300, [], [1], [1, 2, 3], {}, {"a": {"b": [1]}}, "${oc.env:HOME}"]
    keys = list(info) + ["num_anchors", "hidden_dim", "time_encoding_dim", "image_embed_dim", "train_band", "backbone"]
    for i in range(count):
        kind = i % 6
        if kind == 0:  # flip bytes anywhere
            data = bytearray(good)
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            yield bytes(data)
        elif kind == 1:  # truncate or pad
            cut = rng.randrange(len(good))
            yield good[:cut] if rng.random() < 0.7 else good + bytes(rng.randrange(1, 64))
        elif kind == 2:  # one metadata value replaced
            edited = dict(info)
            edited[rng.choice(keys)] = rng.choice(values)
            yield _with_metadata_text(good, json.dumps(edited))
        elif kind == 3:  # a nested backbone / config value replaced
            edited = json.loads(json.dumps(info))
            target = edited["backbone"] if rng.random() < 0.5 else edited.setdefault("config", {})
            target[rng.choice(list(target) or ["x"])] = rng.choice(values)
            yield _with_metadata_text(good, json.dumps(edited))
        elif kind == 4:  # header entry edits
            name = rng.choice([k for k in header if k != "__metadata__"])
            field = rng.choice(["dtype", "shape", "data_offsets"])
            replacement = rng.choice(values + ["F64", "I8", "U8", [0, 0], [3, 3]])
            yield _with_header(good, lambda h: h[name].update({field: replacement}))
        else:  # tensors with other shapes or values
            edited = dict(tensors)
            name = rng.choice(list(edited))
            choice = rng.random()
            if choice < 0.4:
                edited[name] = torch.zeros(rng.randint(0, 9))
            elif choice < 0.7:
                edited[name] = torch.full_like(edited[name], rng.choice([float("nan"), float("inf"), -float("inf")]))
            else:
                edited[f"extra{i}"] = torch.zeros(2)
            yield save_safetensors(edited, metadata={"personamagic": json.dumps(info)})


def test_a_failed_import_keeps_the_sessions_concept(importing, good):
    before = importing.snapshot().concept
    for data in (b"", good[:100], _with_info(good, lambda i: i.update(num_tokens=99))):
        with pytest.raises(ConceptFileError):
            importing.import_concept(data)
        assert importing.snapshot().concept is before


def test_fuzzed_concept_files_get_a_sentence_and_keep_the_concept(importing, good):
    """Seeded, a few hundred cases: only ConceptFileError (a sentence), each within a second or
    so, and the session's previous concept always kept."""
    before = importing.snapshot().concept
    started = time.monotonic()
    outcomes = {"refused": 0, "loaded": 0}
    for data in _malformed_concepts(good, 300):
        case_start = time.monotonic()
        try:
            importing.import_concept(data)
        except ConceptFileError as exc:
            text = str(exc)
            assert text and "Traceback" not in text and len(text) < 600, text
            assert importing.snapshot().concept is before
            outcomes["refused"] += 1
        else:
            outcomes["loaded"] += 1  # an edit that stays valid (e.g. a byte flip inside a weight)
            importing.import_concept(good)
            before = importing.snapshot().concept
        assert time.monotonic() - case_start < 10
    assert outcomes["refused"] > 200, outcomes
    assert time.monotonic() - started < 60


def _malformed_images(count: int, seed: int = 16):
    rng = random.Random(seed)
    bases = []
    for fmt, mode in (("PNG", "RGB"), ("JPEG", "RGB"), ("PNG", "I;16"), ("GIF", "P"), ("TIFF", "RGB"), ("WEBP", "RGB")):
        buffer = io.BytesIO()
        Image.new(mode, (48, 40)).save(buffer, format=fmt)
        bases.append(buffer.getvalue())
    for i in range(count):
        data = bytearray(rng.choice(bases))
        if i % 3 == 0:
            data = data[: rng.randrange(1, len(data))]
        else:
            for _ in range(rng.randint(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        yield bytes(data)


def test_fuzzed_images_get_a_sentence(tmp_path):
    from studio.faces import PhotoError, prepare_photo

    cfg = FaceConfig(backend="dlib")
    started = time.monotonic()
    for data in _malformed_images(150):
        with pytest.raises(PhotoError) as caught:
            prepare_photo(data, cfg)
        assert str(caught.value) and "Traceback" not in str(caught.value)
    assert time.monotonic() - started < 60


def test_photo_work_and_imports_from_many_threads(importing, good):
    """Imports and fuzzed photos from several threads at once: no crash, only sentences."""
    from studio.faces import PhotoError, prepare_photo

    errors: list[str] = []
    images = list(_malformed_images(12, seed=3))

    def work(i: int) -> None:
        try:
            for data in images[i::4]:
                try:
                    prepare_photo(data, FaceConfig(backend="dlib"))
                except PhotoError:
                    pass
            importing.import_concept(good)
        except Exception as exc:  # pragma: no cover - the assertion below reports it
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
