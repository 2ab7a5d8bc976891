"""``coe generate`` on the tiny llama (hf engine): answers, LoRA, streaming, clear errors."""

from __future__ import annotations

from coe.tools.cli import main


def _run(capsys, *argv):
    code = main(["generate", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_prints_the_answer_and_usage(tiny_llama_dir, capsys):
    code, out, err = _run(capsys, "--model", str(tiny_llama_dir), "--engine", "hf", "--raw", "--max-tokens", "5",
                          "--usage", "def x return 1 + 2")
    assert code == 0 and out.strip()
    assert "completion_tokens=5 finish_reason=length" in err


def test_generate_with_adapter_and_stream(tiny_llama_dir, tiny_loras, capsys):
    args = ["--model", str(tiny_llama_dir), "--engine", "hf", "--raw", "--max-tokens", "8", "def x return 1 + 2"]
    code, plain, _ = _run(capsys, *args)
    code2, tuned, _ = _run(capsys, "--adapter", str(tiny_loras[0]), *args)
    code3, streamed, _ = _run(capsys, "--adapter", str(tiny_loras[0]), "--stream", *args)
    assert code == code2 == code3 == 0
    assert tuned != plain and streamed.strip() == tuned.strip()


def test_generate_errors_are_clear(tiny_llama_dir, tmp_path, capsys):
    base = ["--model", str(tiny_llama_dir), "--engine", "hf"]
    code, _, err = _run(capsys, *base, "--adapter", str(tmp_path / "none"), "hello")
    assert code == 2 and "adapter folder" in err and "does not exist" in err
    code, _, err = _run(capsys, *base, "--max-tokens", "300", "hello")
    assert code == 2 and "context is 256 tokens" in err
    code, _, err = _run(capsys, "--model", str(tmp_path / "missing-model"), "hello")
    assert code == 2 and "does not exist" in err
    code, _, err = _run(capsys, *base, "--temperature", "5", "hello")
    assert code == 2 and "temperature" in err
