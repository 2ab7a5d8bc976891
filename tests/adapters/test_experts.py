"""The LoRA experts: data splits, resumable training, the committed folders, the mixture links,
and the evaluation report (paired bootstrap over per-item outcomes)."""

import json
from pathlib import Path

import pytest

from coe.adapters.experts import data
from coe.adapters.experts.evaluate import report, summarize
from coe.adapters.experts.train import main as train_main
from coe.adapters.experts.train_mixture import link_experts, save_referencing

EXPERTS = Path(__file__).resolve().parents[2] / "adapters" / "experts"


def test_held_out_items_are_never_trained_on(shared_data):
    train_q = {p.query for p in data.math_train(500)}
    assert not train_q & {p.query for p in data.math_heldout(500)}
    assert not train_q & {p.query for p in data.math_test()}
    assert len(data.math_heldout(500)) == 500 and all(p.answer and p.reference for p in data.math_heldout(500))
    code_train, code_test = data.code_train(), data.code_heldout()
    assert (len(code_train), len(code_test)) == (374, 500)
    assert not {p.id for p in code_train} & {p.id for p in code_test}
    assert all(p.reference.startswith("```python\n") for p in code_train)


def test_math_test_gold_numbers(shared_data):
    probes = data.math_test()
    assert 1150 < len(probes) <= 1319
    assert probes[0].answer == "18"  # Janet's ducks


def _losses(out: Path) -> list[float]:
    return json.loads((out / "loss.json").read_text())["step_loss"]


def test_training_resumes_exactly(shared_data, tiny_llama_dir, tmp_path):
    common = ["--domain", "code", "--model", str(tiny_llama_dir), "--batch-size", "2", "--rank", "2",
              "--max-len", "256", "--threads", "1", "--warmup", "1", "--save-every", "1"]
    train_main([*common, "--steps", "3", "--out", str(tmp_path / "once"), "--ckpt", str(tmp_path / "c1")])
    train_main([*common, "--steps", "2", "--out", str(tmp_path / "twice"), "--ckpt", str(tmp_path / "c2")])
    train_main([*common, "--steps", "3", "--out", str(tmp_path / "twice"), "--ckpt", str(tmp_path / "c2")])
    assert len(_losses(tmp_path / "once")) == 3
    assert _losses(tmp_path / "twice") == _losses(tmp_path / "once")
    args = json.loads((tmp_path / "twice" / "training_args.json").read_text())
    assert args["steps_done"] == 3 and args["seed"] == 0 and args["n_examples"] > 0
    assert (tmp_path / "twice" / "adapter_model.safetensors").is_file() and (tmp_path / "twice" / "loss.png").is_file()
    with pytest.raises(SystemExit, match="checkpoint made with other arguments"):
        train_main([*common[:-6], "--threads", "1", "--rank", "4", "--steps", "4", "--out", str(tmp_path / "twice"),
                    "--ckpt", str(tmp_path / "c2")])


@pytest.mark.parametrize("name", ["math", "code"])
def test_committed_expert_folders(name):
    folder = EXPERTS / name
    cfg = json.loads((folder / "adapter_config.json").read_text())
    args = json.loads((folder / "training_args.json").read_text())
    assert cfg["r"] == args["rank"] and {"q_proj", "down_proj"} <= set(cfg["target_modules"])
    assert args["domain"] == name and args["seed"] == 0 and args["steps_done"] >= 50
    assert len(_losses(folder)) == args["steps_done"] and (folder / "loss.png").stat().st_size > 0


def test_mixture_links_the_expert_folders():
    for name in ("math", "code"):
        link = EXPERTS / "mixture" / "adapters" / name
        assert link.is_symlink() and link.resolve() == (EXPERTS / name).resolve()


def test_save_referencing_replaces_copies_with_links(tmp_path):
    src = {n: tmp_path / "experts" / n for n in ("a", "b")}
    for f in src.values():
        f.mkdir(parents=True)
        (f / "adapter_config.json").write_text("{}")

    class CopyingMixture:  # what MoLE.save does with the adapter folders
        def save(self, out, sources):
            import shutil

            for n, s in sources.items():
                shutil.copytree(s, out / "adapters" / n, dirs_exist_ok=True)

    out = tmp_path / "mix"
    for _ in range(2):  # a second save (re-fitted gates) goes through the existing links
        save_referencing(CopyingMixture(), out, src)
        for n in src:
            assert (out / "adapters" / n).is_symlink() and (out / "adapters" / n / "adapter_config.json").is_file()
    link_experts(out, src)
    assert (out / "adapters" / "a").readlink() == Path("../../experts/a")


def test_mixture_loads_with_the_linked_experts(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from coe.adapters.mixtures import load_mixture

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    mix = load_mixture(EXPERTS / "mixture", model)
    assert mix.names == ["math", "code"]


def test_summary_pairs_items_and_reports_cis(tmp_path):
    f = tmp_path / "items.jsonl"
    rows = []
    for i in range(40):
        rows.append({"metric": "nll", "domain": "math", "id": str(i), "model": "base", "score": 1.0 + (i % 3) * 0.1, "tokens": 10})
        rows.append({"metric": "nll", "domain": "math", "id": str(i), "model": "expert", "score": 0.8 + (i % 3) * 0.1, "tokens": 10})
        rows.append({"metric": "task", "domain": "code", "id": str(i), "model": "base", "score": float(i < 4), "reason": None if i < 4 else "AssertionError"})
        rows.append({"metric": "task", "domain": "code", "id": str(i), "model": "expert", "score": float(i < 10), "reason": None if i < 10 else "SyntaxError: x"})
    rows.append({"metric": "task", "domain": "code", "id": "unpaired", "model": "expert", "score": 1.0, "reason": None})
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    res = summarize(f, ["math", "code"])
    d = res["math_nll"]["expert_minus_base"]
    assert res["math_nll"]["n"] == 40 and d["mean"] == pytest.approx(-0.2) and d["hi"] < 0
    assert res["code_task"]["n"] == 40 and res["code_task"]["expert_minus_base"]["mean"] == pytest.approx(0.15)
    assert res["code_task"]["reasons_expert"] == {"SyntaxError": 30, "passed": 10}
    md = report({"machine": "m", "model": "x", "adapters": {}, "settings": {}, "items_file": "f", "runs": [], "results": res})
    assert "| smollm2-math | GSM8K reference NLL/token" in md and "-0.200 [-0.200, -0.200]" in md
