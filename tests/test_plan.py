"""Memory plans (`tuner estimate --plan`, `--budget`): every plan the settings allow, estimated, the
fastest that fits chosen; keys the user set are constraints; a larger budget never picks a slower
plan."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tuner.core.cli import app
from tuner.core.config.keys.model import parse_budget
from tuner.core.errors import ConfigError
from tuner.core.estimate.plan import choose, kept_in_place, memory_plans, validation_swap

from .conftest import REPO, base_settings, make_config, make_host

GiB = 2**30


def test_sizes_read_as_users_write_them():
    assert parse_budget("12GiB") == parse_budget("12 GB") == parse_budget("12g") == 12 * GiB
    assert parse_budget("8000MiB") == 8000 * 2**20 and parse_budget("1024") == 1024
    with pytest.raises(ValueError, match="'twelve' is not a size"):
        parse_budget("twelve")


def test_plans_respect_what_the_user_set_and_the_fastest_fitting_one_is_chosen(tiny_chroma, shapes_dir, tmp_path):
    host = make_host()
    free = memory_plans(host, make_config(host, base_settings(tiny_chroma, shapes_dir, tmp_path)), "cuda")
    keys = [tuple(p.settings.values()) for p in free]
    assert len(keys) == len(set(keys))
    assert {p.settings["blocks_to_swap"] for p in free} == {0, 1, 2, 3}  # tiny Chroma: 3 blocks
    for precision in {p.settings["base_model_precision"] for p in free}:  # quantized bases swap too, as stored
        same = [
            p
            for p in free
            if p.settings["base_model_precision"] == precision
            and not p.settings["offload_during_startup"]
            and not p.settings["activation_offload"]
        ]
        by_count = sorted(same, key=lambda p: p.settings["blocks_to_swap"])
        assert [p.settings["blocks_to_swap"] for p in by_count] == [0, 1, 2, 3]
        device = [p.estimate.phase("train").device for p in by_count]
        assert device[0] > device[3] and device == sorted(device, reverse=True), precision
    times = [p.relative_step_time for p in free]
    assert times == sorted(times) and times[0] == 0.75  # gradient_checkpointing false (set by the test)
    # activation offload: a dimension of its own, slower by its measured factor, never more memory
    for plan in free:
        if plan.settings["activation_offload"]:
            kept = next(p for p in free if p.settings == {**plan.settings, "activation_offload": False})
            assert plan.relative_step_time == pytest.approx(kept.relative_step_time * 1.06)
            assert plan.estimate.phase("train").device <= kept.estimate.phase("train").device
    # a larger budget never picks a slower plan, and what is picked fits
    picked = []
    for budget in sorted({p.estimate.plan_device for p in free}):
        for plan in free:
            plan.chosen = False
        chosen = choose(free, budget)
        assert chosen is not None and chosen.estimate.plan_device <= budget and sum(p.chosen for p in free) == 1
        picked.append(chosen.relative_step_time)
    assert picked == sorted(picked, reverse=True)
    assert choose(free, min(p.estimate.plan_device for p in free) - 1) is None
    fixed = make_config(
        host,
        {**base_settings(tiny_chroma, shapes_dir, tmp_path), "blocks_to_swap": 2, "base_model_precision": "no_change"},
    )
    plans = memory_plans(host, fixed, "cuda")
    assert {(p.settings["base_model_precision"], p.settings["blocks_to_swap"]) for p in plans} == {("no_change", 2)}
    # checkpointing left free is a dimension: without it a step is faster and holds more
    unset = {k: v for k, v in base_settings(tiny_chroma, shapes_dir, tmp_path).items() if k != "gradient_checkpointing"}
    plans = memory_plans(host, make_config(host, {**unset, "base_model_precision": "no_change", "blocks_to_swap": 0,
                                                  "activation_offload": False, "offload_during_startup": False}), "cuda")  # fmt: skip
    assert [(p.settings["gradient_checkpointing"], p.relative_step_time) for p in plans] == [(False, 0.75), (True, 1.0)]
    assert plans[0].estimate.phase("train").device > plans[1].estimate.phase("train").device


def test_the_command_prints_the_plans_and_a_budget_nothing_fits_is_one_line(tiny_chroma, shapes_dir, tmp_path):
    settings = [f"{k}={v}" for k, v in base_settings(tiny_chroma, shapes_dir, tmp_path).items()]
    command = ["estimate", "--plugin", "chroma", "--device", "cuda", *[a for s in settings for a in ("--set", s)]]
    out = CliRunner().invoke(app, [*command, "--plan", "--budget", "1GiB", "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert sum(r["chosen"] for r in rows) == 1 and rows[0]["chosen"]  # fastest first, and it fits 1 GiB
    assert set(rows[0]) == {
        "keys",
        "peak_device_bytes",
        "plan_device_bytes",
        "peak_host_bytes",
        "relative_step_time",
        "chosen",
    }
    out = CliRunner().invoke(app, [*command, "--budget", "1KiB"])
    assert isinstance(out.exception, ConfigError) and "\n" not in str(out.exception)
    assert str(out.exception).startswith("--budget 1KiB: no plan fits; the smallest needs ")


@pytest.mark.slow
def test_the_real_chromas_plans_fit_their_budgets_and_more_memory_is_never_slower():
    """The bundled real Chroma 1 config files (no weights), on a GPU's terms: the precision left to
    the plan, and bf16 as the user would fix it (its plans are the no_change ones of the same
    traces: the tiny model's test shows that fixing a key leaves only its value)."""
    host = make_host()
    config = make_config(
        host,
        {
            "pretrained_model_name_or_path": str(REPO / "examples" / "models" / "chroma1-configs"),
            "resolution": 1024,
            "mixed_precision": "bf16",
            "gradient_checkpointing": True,  # one dimension fewer to trace (the tiny model's test varies it)
            "activation_offload": False,  # likewise
            "offload_during_startup": True,  # likewise (the caching phases traced once, not twice)
            "validation_prompts": ["a red circle"],
            "data_dir": str(REPO / "examples" / "data" / "shapes"),
        },
    )
    free = memory_plans(host, config, "cuda")
    # any precision: from 8 GiB up every budget finds a plan, and more memory is never slower;
    # 6 GiB: encoding the images at 1024 px (the VAE, 5.2 GiB of tensors) is the floor at any precision
    assert choose(free, 6 * GiB) is None
    budgets = (8, 12, 16, 24, 80)
    chosen = [choose(free, budget * GiB) for budget in budgets]
    assert all(c is not None and c.estimate.plan_device <= b * GiB for c, b in zip(chosen, budgets, strict=True))
    times = [c.relative_step_time for c in chosen]
    assert times == sorted(times, reverse=True) and times[-1] == 1.0
    assert chosen[-1].settings["base_model_precision"] == "no_change"

    plans = [p for p in free if p.settings["base_model_precision"] == "no_change"]  # bf16, fixed
    times = []
    for budget in (6, 8, 12, 16, 24, 80):
        chosen = choose(plans, budget * GiB)
        if chosen is None:  # 6 GiB: below the caching floor
            assert budget < 12
            continue
        assert chosen.estimate.plan_device <= budget * GiB
        times.append(chosen.relative_step_time)
    assert times == sorted(times, reverse=True) and times[-1] == 1.0  # 80 GiB: nothing swapped
    chosen = choose(plans, 16 * GiB)
    assert chosen.settings["blocks_to_swap"] > 0  # bf16 Chroma in 16 GiB: by swapping
    # validation holds no gradients or optimizer state: it keeps more blocks in place, as many as fit
    fewer = validation_swap(chosen, 16 * GiB)
    validate = chosen.estimate.phase("validate").device
    assert fewer < chosen.settings["blocks_to_swap"]
    assert chosen.estimate.plan(validate + kept_in_place(chosen.estimate, fewer)) <= 16 * GiB
    assert fewer == 0 or chosen.estimate.plan(validate + kept_in_place(chosen.estimate, fewer - 1)) > 16 * GiB


def test_memory_budget_sets_the_chosen_plans_keys_before_anything_loads(tiny_chroma, shapes_dir, tmp_path):
    """What `tuner run` does with memory_budget (on a GPU's terms; on a CPU it says it changes nothing):
    the fastest plan that fits sets the keys the user left unset; a budget nothing fits is one line;
    a budget that is not a size is refused when the config is read."""
    from types import SimpleNamespace

    import torch

    from tuner.core.run.planning import apply_memory_budget

    host = make_host()
    said: list[str] = []

    def run_context(**extra):
        config = make_config(host, {**base_settings(tiny_chroma, shapes_dir, tmp_path), **extra})
        accelerator = SimpleNamespace(num_processes=1)
        return SimpleNamespace(
            config=config,
            host=host,
            device=torch.device("cuda"),
            accelerator=accelerator,
            log=said.append,
            warn=said.append,
        )

    roomy = run_context(memory_budget="80GiB")
    apply_memory_budget(roomy)
    assert (roomy.config.base_model_precision, roomy.config.blocks_to_swap) == ("no_change", 0)
    import tuner.core.estimate.plan as plan_module

    def planned_again(*args):
        raise AssertionError("the plans of these settings were remembered under cache_dir")

    with pytest.MonkeyPatch.context() as patch:  # another budget, the same settings: no new trace
        patch.setattr(plan_module, "memory_plans", planned_again)
        apply_memory_budget(run_context(memory_budget="40GiB"))
    fixed = run_context(memory_budget="80GiB", base_model_precision="int8-quanto")  # a constraint
    apply_memory_budget(fixed)
    assert (fixed.config.base_model_precision, fixed.config.blocks_to_swap) == ("int8-quanto", 0)
    assert said[-1].startswith("memory_budget 80.00 GiB: base_model_precision int8-quanto, gradient_checkpointing")
    with pytest.raises(ConfigError, match=r"memory_budget: .* no plan fits; the smallest needs") as info:
        apply_memory_budget(run_context(memory_budget="1KiB"))
    assert "\n" not in str(info.value)
    import tuner.core.estimate as estimate_module

    with pytest.MonkeyPatch.context() as patch:  # the card would do, the machine's RAM would not
        patch.setattr(estimate_module, "available_ram", lambda: 1024)
        with pytest.raises(ConfigError, match=r"80.00 GiB: the plans that fit need at least .* of system RAM"):
            apply_memory_budget(run_context(memory_budget="80GiB"))
    cpu = run_context(memory_budget="1KiB")
    cpu.device = torch.device("cpu")
    apply_memory_budget(cpu)
    assert "on a CPU the weights stay in RAM" in said[-1]
    with pytest.raises(ConfigError, match=r"memory_budget: 'twelve' is not a size.*or auto"):
        run_context(memory_budget="twelve")
