"""bench/profile_interference.py: the summary and the table (the engine run itself is the benchmark)."""

from types import SimpleNamespace

from bench.profile_interference import CONDITIONS, markdown, summarise


def rows_of(round_, chat_s: dict[str, float], tokens: int = 60) -> list[dict]:
    return [{"round": round_, "condition": name, "chat_s": [chat_s[name]] * 3,
             "background_tokens": tokens if CONDITIONS[name][0] else 0, "window_s": 2.0} for name in CONDITIONS]


def test_ratios_are_per_round_and_tokens_per_second_pool_the_windows():
    rows = rows_of("0.0", {"idle": 1.0, "lora1": 2.0, "lora2": 3.0, "base2": 1.0}) \
        + rows_of("0.1", {"idle": 2.0, "lora1": 3.0, "lora2": 4.0, "base2": 2.0})
    got = summarise(rows)["conditions"]
    assert got["idle"]["ratio_to_idle"] == 1.0 and got["idle"]["background_tokens_per_s"] is None
    assert got["lora1"]["ratio_range"] == [1.5, 2.0] and got["lora1"]["ratio_to_idle"] == 1.75
    assert got["lora2"]["chat_p50_s"] == 3.5 and got["lora2"]["background_tokens_per_s"] == 30.0


def test_markdown_has_a_row_per_arithmetic_and_condition():
    res = {"ops": {ops: {"wrapper": wrapper, **summarise(rows_of("0.0", {"idle": 1.0, "lora1": 2.0, "lora2": 2.0,
                                                                              "base2": 1.0}))}
                   for ops, wrapper in (("coe", "GroupedPunicaCPU"), ("vllm", "PunicaWrapperCPU"))}}
    args = SimpleNamespace(chat_tokens=16, chats=4, probe_tokens=64, rounds=3, repeats=2)
    md = markdown(res, args)
    assert md.count("| coe (GroupedPunicaCPU) |") == len(CONDITIONS) == md.count("| vllm (PunicaWrapperCPU) |")
    assert "| lora1 | 1 on the math LoRA | 2.0 | 2.0 [2.0-2.0] | 30.0 |" in md
