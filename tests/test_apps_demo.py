"""`diffalign demo` on the bundled toy world: a small end-to-end run writes the report with every section."""

from __future__ import annotations

import json
import shutil

import pytest
from clitools import UMASK, run_cli, umask, wrong_modes
from PIL import Image

from diffalign.apps import demo
from diffalign.apps.sections import dpo as dpo_section
from diffalign.apps.sections import toy_training
from diffalign.gym.world import heldout_prompts, train_prompts
from diffalign.methods import METHODS, demo_methods
from diffalign.processes import reset_accelerate_state

SMALL = demo.DemoSettings(
    eval_samples=18, pairs_repeats=1, images_per_prompt=2, validation_every=2, validation_images=1,
    sizes={"dpo": {"steps": 4}, "inpo": {"steps": 2}, "alignprop": {"steps": 2},
           "grpo": {"steps": 2, "rollout": (2, 4)}, "nft": {"steps": 2, "rollout": (2, 4)},
           "reno": {"samples": 9, "iters": 3},
           "rlg": {"scales": (0.0, 1.0, 2.0), "samples": 64, "scale": 2.0}},
)  # fmt: skip


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    reset_accelerate_state()
    try:
        with umask(UMASK):  # the demo writes every kind of output (LoRAs, checkpoints, grids, HTML) under it
            metrics = demo.run_demo(out, settings=SMALL, methods=list(METHODS))  # GRPO and NFT too (not defaults)
    finally:
        reset_accelerate_state()
    return out, metrics


def test_every_file_of_the_demo_has_the_umasks_mode(demo_run):
    out, _ = demo_run
    assert list(out.rglob("*.safetensors")) and list(out.rglob("*.png"))
    wrong = wrong_modes(out)
    assert not wrong, "\n".join(wrong)


def test_demo_writes_report_metrics_and_grids(demo_run):
    out, metrics = demo_run
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["settings"]["eval_samples"] == 18 and saved["seconds"] > 0
    dpo = saved["methods"]["dpo"]
    for result in (saved["base"], dpo["after"]):
        assert result["n"] == 18
        for key in ("all_correct", "background", "colour", "shape", "proxy_score"):
            assert isinstance(result[key], float)
    gain = dpo["gain"]["all_correct"]
    assert gain["gain"] == pytest.approx(dpo["after"]["all_correct"] - saved["base"]["all_correct"])
    assert gain["paired_se"] >= 0
    assert dpo["pairs"] + dpo["ties"] == len(train_prompts())  # one best-vs-worst pair per prompt
    curves = dpo["curves"]
    assert [step for step, _ in curves["proxy"]] == [0, 2, 4]  # before training, then every 2 of 4 steps
    assert len(curves["gold_all_correct"]) == 3 and len(curves["loss"]) >= 1
    for grid in (out / "base_grid.png", out / "dpo" / "after_grid.png"):
        assert Image.open(grid).size[0] > 32
    assert (out / "dpo" / "seed0" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_demo_report_has_every_section(demo_run):
    out, metrics = demo_run
    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    for section in ("<h2>Summary</h2>", "<h2>Base model</h2>", "<h2>Diffusion-DPO</h2>", "<h2>RL guidance (RLG)</h2>"):
        assert section in html
    for chart in ("held-out proxy reward during training", "held-out gold accuracy during training"):
        assert chart in html
    assert html.count("<svg") >= 3 and html.count("data:image/png;base64,") >= 2 * 18
    assert all(prompt in html for prompt in heldout_prompts())
    assert f"{metrics['base']['all_correct']:.3f}" in html


def test_demo_inpo_section_trains_on_the_dpo_pairs(demo_run):
    out, metrics = demo_run
    inpo, dpo = metrics["methods"]["inpo"], metrics["methods"]["dpo"]
    assert (inpo["pairs"], inpo["ties"]) == (dpo["pairs"], dpo["ties"]) and inpo["steps"] == SMALL.size("inpo", "steps")
    assert inpo["after"]["n"] == 18 and inpo["train_seconds"] > 0 and inpo["train_cpu_seconds"] > 0
    assert [step for step, _ in inpo["curves"]["proxy"]] == [0, 2]
    assert (out / "inpo" / "seed0" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert Image.open(out / "inpo" / "after_grid.png").size[0] > 32
    assert "<h2>DDIM-InPO</h2>" in (out / "report.html").read_text()


def test_demo_alignprop_section_logs_the_proxy_and_gold_curves(demo_run):
    out, metrics = demo_run
    alignprop = metrics["methods"]["alignprop"]
    assert alignprop["steps"] == SMALL.size("alignprop", "steps") and alignprop["after"]["n"] == 18
    curves = alignprop["curves"]
    assert [step for step, _ in curves["proxy"]] == [0, 1, 2]  # validated 5 times a run, at most every step
    assert len(curves["gold_all_correct"]) == 3 and [step for step, _ in curves["reward"]] == [1, 2]
    html = (out / "report.html").read_text()
    assert "<h2>AlignProp</h2>" in html and "proxy reward (toy-clip) during training" in html
    assert "through all 10 sampling steps" in html  # configs/alignprop/toy.yaml: truncation full


def test_demo_rlg_section_sweeps_the_dpo_sections_lora(demo_run):
    """RLG reuses the DPO section's LoRA (no second training); w = 0 is the base, w = 1 the DPO model measured by
    the DPO section (same seeds), and the report has the sweep table, curves and grid."""
    out, _ = demo_run
    saved = json.loads((out / "metrics.json").read_text())
    rlg, dpo = saved["methods"]["rlg"], saved["methods"]["dpo"]
    assert rlg["lora"] == "dpo/seed0/lora" and not (out / "rlg" / "dpo-seed0").exists()
    rows = {row["scale"]: row for row in rlg["sweep"]}
    assert list(rows) == [0, 1, 2] and all(row["n"] == 18 for row in rows.values())
    assert rows[0]["gain_all_correct"] == 0 and rows[0]["all_correct"] == saved["base"]["all_correct"]
    assert rows[1]["all_correct"] == pytest.approx(dpo["after"]["all_correct"])
    assert rows[1]["proxy"] == pytest.approx(dpo["after"]["proxy_score"], abs=1e-3)
    assert rlg["after"]["n"] == 18 and rlg["scale"] == 2
    assert Image.open(out / "rlg" / "sweep_grid.png").size == (9 * 32, 3 * 32)
    html = (out / "report.html").read_text()
    assert "<h2>RL guidance (RLG)</h2>" in html and "gold all-correct vs w" in html


def test_rlg_section_trains_dpo_itself_only_without_a_recorded_lora(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from diffalign.apps.sections import rlg as rlg_section

    trained = []

    def fake_train(ctx, method, out, steps, extra):
        trained.append((method, out, steps, extra))
        return out / "lora"

    monkeypatch.setattr(toy_training, "train_on_toy", fake_train)
    ctx = SimpleNamespace(
        loras={}, seed=3, work=tmp_path, settings=SMALL, console=demo.Console(stderr=True),
        pairs=lambda: {"path": tmp_path / "pairs.parquet"},
    )  # fmt: skip
    lora = rlg_section.dpo_lora(ctx)
    assert trained == [("dpo", tmp_path / "rlg" / "dpo-seed3", 4, [f"data.source={tmp_path / 'pairs.parquet'}"])]
    assert ctx.loras[("dpo", 3)] == lora
    assert rlg_section.dpo_lora(ctx) == lora and len(trained) == 1  # recorded: not trained again


def test_a_failed_demo_keeps_the_previous_report(demo_run, monkeypatch):
    out, _ = demo_run
    before = (out / "report.html").read_text()

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(dpo_section, "dpo_section", broken)
    with pytest.raises(RuntimeError, match="boom"):
        demo.run_demo(out, settings=SMALL)
    assert (out / "report.html").read_text() == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("existing", ["a folder of the user's", "a file"])
def test_demo_never_replaces_what_it_did_not_write(existing, tmp_path):
    out = tmp_path / "out"
    if existing == "a file":
        out.write_text("notes")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("notes")
    result = run_cli("demo", "--quick", "--out", str(out))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {out} exists and is not a folder this command")
    assert (out.read_text() if out.is_file() else (out / "notes.txt").read_text()) == "notes"


def test_the_previous_demo_and_an_empty_folder_may_be_replaced(demo_run, tmp_path):
    from diffalign.io import atomic_dir

    previous = shutil.copytree(demo_run[0], tmp_path / "previous")
    (tmp_path / "empty").mkdir()
    for folder in (previous, tmp_path / "empty"):
        with atomic_dir(folder, marker="metrics.json") as work:
            (work / "metrics.json").write_text("{}")
        assert [p.name for p in folder.iterdir()] == ["metrics.json"]


def test_demo_command_help_lists_quick():
    result = run_cli("demo", "--help")
    assert result.returncode == 0 and "--quick" in result.stdout


def test_demo_verdict_names_significance_and_every_significant_regression():
    """The full demo's colour fell 0.740 -> 0.678 (about 3 SE) while all-correct rose, and the summary did not say
    so: the verdict now names every gold measure that fell beyond 2 paired SE."""

    def gain(before, after, se):
        return {"before": before, "after": after, "gain": after - before, "paired_se": se}

    rose = {"all_correct": gain(0.26, 0.33, 0.02), "colour": gain(0.740, 0.678, 0.02), "shape": gain(0.8, 0.79, 0.02)}
    text = demo.verdict(rose, quick=False)
    assert "rose by 7.0 points" in text
    assert "Significantly worse (beyond 2 paired SE): colour 0.740 → 0.678 (-6.2 ± 2.0 points)." in text
    assert "shape" not in text  # -1 point is within noise
    assert "fell by 7.0 points" in demo.verdict({"all_correct": gain(0.3, 0.23, 0.02)}, quick=False)
    within = demo.verdict({"all_correct": gain(0.3, 0.33, 0.02)}, quick=True)
    assert "within 2 paired SE" in within and "full demo" in within
    line = demo.summary_lines(
        {"methods": {"dpo": {"title": "Diffusion-DPO", "gain": rose | {"proxy": gain(52.0, 56.2, 0.3)}}}}
    )[0]
    assert line.startswith("Diffusion-DPO: gold all-correct 0.260 -> 0.330 (+7.0 ± 2.0 points, paired SE)")
    assert "proxy 52.0 -> 56.2 (+4.20 ± 0.30)" in line and line.endswith(
        "worse: colour 0.740 → 0.678 (-6.2 ± 2.0 points)"
    )


def test_pairs_are_made_once_for_every_training_seed(monkeypatch, tmp_path):
    """`with_seed` copies share the pairs, whichever copy makes them (the acceptance script trains 3 seeds)."""
    from diffalign.apps import pairs as pairs_app

    calls = []

    def fake_make_pairs(model, prompts, reward, out, **kwargs):
        calls.append(out)
        return {"pairs": 7, "ties": 1}

    monkeypatch.setattr(pairs_app, "make_pairs", fake_make_pairs)
    ctx = demo.DemoContext(
        family=None, proxy=None, heldout=[], train=["a"], settings=SMALL, work=tmp_path
    )  # fmt: skip
    first = ctx.with_seed(1).pairs()
    assert ctx.with_seed(2).pairs() == first == ctx.pairs() and first["pairs"] == 7
    assert calls == [tmp_path / "pairs.parquet"]


@pytest.mark.parametrize(
    ("method", "title", "watched"), [("grpo", "GRPO", "ratio"), ("nft", "DiffusionNFT", "optimality")]
)
def test_demo_rollout_sections_log_rollout_rewards_beside_the_proxy_and_gold_curves(demo_run, method, title, watched):
    out, metrics = demo_run
    section = metrics["methods"][method]
    assert section["steps"] == 2 and section["rollout"] == [2, 4] and section["after"]["n"] == 18
    curves = section["curves"]
    assert [step for step, _ in curves["proxy"]] == [0, 2] and len(curves["gold_all_correct"]) == 2
    assert [step for step, _ in curves["reward"]] == [2] and [step for step, _ in curves[watched]] == [2]
    html = (out / "report.html").read_text()
    assert f"<h2>{title}</h2>" in html and "2 groups of 4 images" in html and f"configs/{method}/toy.yaml" in html


def test_every_section_runs_on_the_flow_toy_with_its_own_configs(tmp_path):
    """`diffalign demo --model toy-flow`: the SD3-class toy through every default section (its pairs, its
    configs/<method>/toy-flow.yaml, ReNO at its few steps, RLG on its DPO LoRA), one report. (The opt-in sections
    are the same code on either toy: they run on the UNet toy above, and their toy-flow configs in the GPU check's
    matrix, tests/test_gpu_check.py.)"""
    reset_accelerate_state()
    try:
        metrics = demo.run_demo(tmp_path / "flow", settings=SMALL, model="toy-flow", methods=demo_methods())
    finally:
        reset_accelerate_state()

    assert metrics["model"] == "toy-flow" and list(metrics["methods"]) == demo_methods()
    assert all(m["after"]["n"] > 0 for m in metrics["methods"].values())
    html = (tmp_path / "flow" / "report.html").read_text()
    assert "toy-flow (StableDiffusion3Pipeline)" in html and "configs/dpo/toy-flow.yaml" in html
    run = json.loads((tmp_path / "flow" / "dpo" / "seed0" / "run.json").read_text())
    assert run["model.name"] == "toy-flow"


def test_demo_refuses_a_model_that_is_not_a_bundled_toy(tmp_path):
    result = run_cli("demo", "--model", "tiny-sd", "--out", str(tmp_path / "d"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == "error: 'tiny-sd' is not a bundled toy model; choose toy or toy-flow"
