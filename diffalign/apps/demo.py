"""`diffalign demo`: the methods run end to end on the toy shapes world, with an HTML report.

The base model is measured once on held-out prompts (gold checker and proxy reward, fixed seeds); then each selected
method's section (the records of `diffalign.methods.METHODS`, DPO first) runs its method on the toy world and is
measured with the SAME seeds, so every before/after comparison is paired. Sections share what they can (the base
evaluation, the preference pairs). The report has one part per section and ends with one table comparing the methods
on the same gold metric. Writes report.html, metrics.json and PNG grids; the output folder is replaced only on
success."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from diffalign.errors import UserError
from diffalign.io import atomic_dir

PROXY = "toy-clip"


@dataclass(frozen=True)
class DemoSettings:
    """How much work the demo does: the shared measurement and data sizes, and each method's own sizes
    (`sizes[method]`, e.g. {"steps": 200}; the full and quick demos take them from the method records)."""

    eval_samples: int
    """Samples on held-out prompts for the before/after measurement (same seeds before and after)."""
    pairs_repeats: int
    """Each training prompt is used this many times by `pairs` (each time with new seeds)."""
    images_per_prompt: int
    validation_every: int
    validation_images: int
    """Validation images per held-out prompt during training (the curves)."""
    sizes: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per method, the sizes its section reads (`size`)."""

    def size(self, method: str, key: str) -> Any:
        """The size `key` of `method`'s section; a one-line error when these settings do not give it."""
        try:
            return self.sizes[method][key]
        except KeyError:
            raise UserError(f"demo settings: no {key!r} size for {method} (give sizes[{method!r}][{key!r}])") from None

    def with_size(self, method: str, **sizes: Any) -> DemoSettings:
        """These settings with `method`'s sizes updated."""
        return dataclasses.replace(self, sizes={**self.sizes, method: {**self.sizes.get(method, {}), **sizes}})


def preset(kind: str, **shared: Any) -> DemoSettings:
    """The full or quick demo: the shared sizes given and every method's `full` / `quick` sizes from its record."""
    from diffalign.methods import METHODS

    return DemoSettings(**shared, sizes={name: dict(getattr(m, kind)) for name, m in METHODS.items()})


# The budgets: full <= 15 min, quick <= 5 min on 2 CPU cores with every section; where the time goes, and why these
# sizes, in docs/results/demo.md. Each method's own sizes are in its record (diffalign/methods.py).
FULL = preset("full", eval_samples=384, pairs_repeats=16, images_per_prompt=4, validation_every=50, validation_images=2)
# Quick: every method at smoke size, a smoke run, not a measurement: the full demo is the one that shows alignment.
QUICK = preset(
    "quick", eval_samples=128, pairs_repeats=8, images_per_prompt=2, validation_every=50, validation_images=2
)


@dataclass
class DemoContext:
    """What the sections share: the toy model, the proxy reward, the prompts, the settings, the seeds, the base
    evaluation and (made once, on first use) the preference pairs."""

    family: Any
    proxy: Any
    heldout: list[str]
    train: list[str]
    settings: DemoSettings
    work: Path
    """The demo's output folder (while it is being written)."""
    model: str = "toy"
    """Which bundled toy the family is ('toy' or 'toy-flow'): the method configs are configs/<method>/<model>.yaml."""
    seed: int = 0
    """Training seed of the methods."""
    eval_seed: int = 0
    """Seed of the held-out evaluation samples (the same before and after every method)."""
    pairs_seed: int = 1
    train_overrides: list[str] = field(default_factory=list)
    """key=value overrides applied to every method's toy config (after the demo's own)."""
    console: Console = field(default_factory=lambda: Console(stderr=True))
    base: dict[str, Any] | None = None
    loras: dict[tuple[str, int], Path] = field(default_factory=dict)
    """LoRAs the sections trained, by (method, training seed): what inference-time sections (RLG) build on."""
    shared_pairs: dict[str, Any] = field(default_factory=dict)
    """The pairs once made ({"path", "pairs", "ties"}): one dict shared by every `with_seed` copy (made once)."""

    def measure(self, num_samples: int | None = None) -> dict[str, Any]:
        """Gold and proxy metrics of the family as it is now, on the held-out prompts with the evaluation seeds (the
        first `num_samples` of them; default all `eval_samples`)."""
        from diffalign.apps.toy_evaluation import evaluate

        return evaluate(
            self.family, self.heldout, num_samples or self.settings.eval_samples, self.eval_seed, proxy=self.proxy,
            return_images=True, progress=True,
        )  # fmt: skip

    def pairs(self) -> dict[str, Any]:
        """AI-feedback pairs on the training prompts ranked by the proxy (made once, shared by the sections)."""
        if not self.shared_pairs:
            from diffalign.apps.pairs import make_pairs

            path = self.work / "pairs.parquet"
            summary = make_pairs(
                self.model,
                self.train * self.settings.pairs_repeats,
                PROXY,
                path,
                images_per_prompt=self.settings.images_per_prompt,
                seed=self.pairs_seed,
            )
            self.shared_pairs.update(path=path, pairs=summary.get("pairs"), ties=summary.get("ties"))
        return self.shared_pairs

    def config_name(self, method: str) -> str:
        """The shipped config `method` runs with on this toy: "<method>/<model>.yaml" (under configs/)."""
        return f"{method}/{self.model}.yaml"

    def with_seed(self, seed: int) -> DemoContext:
        """The same context for another training seed: the base evaluation, the pairs (made once, whichever copy
        makes them) and the recorded LoRAs are shared, not copied."""
        return dataclasses.replace(self, seed=seed)


@dataclass
class SectionResult:
    """What a method section reports: the after-measurement (same seeds as the base), its training curves, and the
    HTML of its part of the report."""

    key: str
    title: str
    optimises: str
    """What the method trains or optimises, in a few words (the comparison table's second column)."""
    after: dict[str, Any]
    seconds: float
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    """JSON-able numbers for metrics.json (e.g. how many pairs)."""
    html: list[str] = field(default_factory=list)
    before: dict[str, Any] | None = None
    """The section's own before-measurement when it is not the shared base (e.g. ReNO: its few-step images of the
    same seeds without ReNO); None: `DemoContext.base`."""

    def baseline(self, ctx: DemoContext) -> dict[str, Any]:
        """What the section's after-measurement is compared with (paired, same prompts and seeds)."""
        return ctx.base if self.before is None else self.before


def toy_config(name: str) -> Path:
    """A shipped config of the toy world (`configs/<method>/<toy>.yaml`), found beside the package or installed."""
    from diffalign.hub import CONFIGS_DIR

    path = CONFIGS_DIR / name
    if not path.is_file():
        raise UserError(f"the toy config {path} is missing (it ships with diffalign: reinstall it)")
    return path


def run_demo(
    out: str | Path = "runs/demo",
    quick: bool = False,
    seed: int = 0,
    settings: DemoSettings | None = None,
    methods: list[str] | None = None,
    console: Console | None = None,
    model: str = "toy",
) -> dict[str, Any]:
    """Run the demo on the bundled toy `model` ('toy' or 'toy-flow') into `out` (replacing a previous demo there only
    once it has succeeded); returns its metrics."""
    from diffalign.gym.world import heldout_prompts, train_prompts
    from diffalign.hub import check_toy
    from diffalign.methods import METHODS, demo_methods
    from diffalign.models import load_family
    from diffalign.rewards import load_reward

    methods = methods or demo_methods()
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"demo --methods: unknown {', '.join(unknown)}; known: {', '.join(METHODS)}")
    check_toy(model)
    console = console or Console(stderr=True)
    settings = settings or (QUICK if quick else FULL)
    out = Path(out)
    started = time.perf_counter()
    with atomic_dir(out, marker="metrics.json") as work:  # a failed demo leaves the previous one in `out` untouched
        ctx = DemoContext(
            family=load_family(model), proxy=load_reward(PROXY), heldout=heldout_prompts(), train=train_prompts(),
            settings=settings, work=work, model=model, seed=seed, eval_seed=seed, pairs_seed=seed + 1, console=console,
        )  # fmt: skip
        steps = len(methods) + 1
        console.print(
            f"[bold]1/{steps} base model[/]: {settings.eval_samples} samples on {len(ctx.heldout)} held-out prompts"
        )
        ctx.base = ctx.measure()
        base_seconds = round(time.perf_counter() - started, 1)
        results = []
        for n, key in enumerate(methods, start=2):
            console.print(f"[bold]{n}/{steps} {METHODS[key].title}[/]")
            result = METHODS[key].section_function()(ctx)
            console.print(f"  {result.title}: {result.seconds:.0f} s")
            results.append(result)
        metrics = demo_metrics(ctx, results, quick, base_seconds, time.perf_counter() - started)
        (work / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (work / "report.html").write_text(render_report(ctx, results, metrics))
        save_grid(ctx.base, work / "base_grid.png")
        for result in results:
            save_grid(result.after, work / result.key / "after_grid.png")
    console.print(f"report: {out / 'report.html'}  ({metrics['seconds']:.0f} s)")
    for line in summary_lines(metrics):
        console.print(line)
    return metrics


def strip(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able numbers of an `evaluate` result (no images, per-image tensors or settings)."""
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str))}


def demo_metrics(
    ctx: DemoContext, results: list[SectionResult], quick: bool, base_seconds: float, seconds: float
) -> dict[str, Any]:
    """metrics.json: settings, the base measurement, and per method its after-measurement and paired gains."""
    from diffalign.apps.toy_evaluation import paired_gain

    metrics: dict[str, Any] = {
        "settings": dataclasses.asdict(ctx.settings),
        "quick": quick,
        "model": ctx.model,
        "seed": ctx.seed,
        "base": strip(ctx.base) | {"seconds": base_seconds},
        "methods": {},
    }
    for result in results:
        metrics["methods"][result.key] = {
            "title": result.title,
            "optimises": result.optimises,
            **result.facts,
            "curves": result.curves,
            **({} if result.before is None else {"before": strip(result.before)}),
            "after": strip(result.after),
            "gain": paired_gain(result.baseline(ctx), result.after),
            "seconds": round(result.seconds, 1),
        }
    metrics["seconds"] = round(seconds, 1)
    return metrics


GAIN_KEYS = ("all_correct", "background", "colour", "shape")


def points(gain: dict[str, float]) -> str:
    """A paired gain as "+7.8 ± 2.1" points (percentage points of a rate)."""
    return f"{100 * gain['gain']:+.1f} ± {100 * gain['paired_se']:.1f}"


def regressions(gain: dict[str, dict[str, float]]) -> list[str]:
    """The gold measures that fell by more than 2 paired SE, as "colour 0.740 → 0.678 (-6.2 ± 2.0 points)"."""
    return [
        f"{key} {gain[key]['before']:.3f} → {gain[key]['after']:.3f} ({points(gain[key])} points)"
        for key in GAIN_KEYS
        if key in gain and gain[key]["gain"] < -2 * gain[key]["paired_se"]
    ]


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """The headline numbers printed at the end of a run: per method, gold all-correct before -> after with the
    paired SE, the proxy, and any gold measure that got significantly worse."""
    lines = []
    for result in metrics["methods"].values():
        gain = result["gain"]
        gold, proxy = gain["all_correct"], gain["proxy"]
        line = (
            f"{result['title']}: gold all-correct {gold['before']:.3f} -> {gold['after']:.3f} "
            f"({points(gold)} points, paired SE); proxy {proxy['before']:.1f} -> {proxy['after']:.1f} "
            f"({proxy['gain']:+.2f} ± {proxy['paired_se']:.2f})"
        )
        worse = regressions(gain)
        lines.append(line + (f"; worse: {'; '.join(worse)}" if worse else ""))
    return lines


def save_grid(result: dict[str, Any], path: Path) -> None:
    from diffalign.io import image_grid, save_png

    save_png(image_grid(result["images"][:64], columns=8), path)


def verdict(gain: dict[str, dict[str, float]], quick: bool) -> str:
    """Sentences on whether the gold all-correct rate changed beyond noise (2 paired SE), naming every gold attribute
    that fell significantly even when the headline rose."""
    headline = gain["all_correct"]
    change, se = headline["gain"], headline["paired_se"]
    if change > 2 * se:
        text = (
            f"The gold all-correct rate on held-out prompts rose by {100 * change:.1f} points, more than 2 paired SE."
        )
    elif change < -2 * se:
        text = (
            f"The gold all-correct rate on held-out prompts fell by {-100 * change:.1f} points, more than 2 paired SE."
        )
    else:
        hint = (
            " The quick settings use few samples and steps; run the full demo for a measurable effect." if quick else ""
        )
        text = f"The change in gold all-correct ({100 * change:+.1f} points) is within 2 paired SE of zero.{hint}"
    worse = [item for item in regressions(gain) if not item.startswith("all_correct")]
    if worse:
        text += " Significantly worse (beyond 2 paired SE): " + "; ".join(worse) + "."
    return text


def result_row(name: str, result: dict[str, Any]) -> list[object]:
    """A row of the per-attribute table."""
    return [
        name,
        f"{result['all_correct']:.3f} ± {result['all_correct_se']:.3f}",
        result["background"],
        result["colour"],
        result["shape"],
        f"{result['proxy_score']:.3f} ± {result['proxy_score_se']:.3f}",
    ]


ATTRIBUTE_HEADERS = ["model", "gold all-correct ± SE", "background", "colour", "shape", "proxy ± SE"]


def render_report(ctx: DemoContext, results: list[SectionResult], metrics: dict[str, Any]) -> str:
    """The HTML page: summary tables comparing the methods, the base model, then one part per method section."""
    from diffalign.apps import report

    base = ctx.base
    comparison, attributes, verdicts = [], [], []
    for result in results:
        gain = metrics["methods"][result.key]["gain"]
        gold, proxy = gain["all_correct"], gain["proxy"]
        proxy_text = f"{proxy['before']:.1f} → {proxy['after']:.1f} ({proxy['gain']:+.2f} ± {proxy['paired_se']:.2f})"
        gold_text = f"{gold['before']:.3f} → {gold['after']:.3f}"
        comparison.append(
            [result.title, result.optimises, proxy_text, gold_text, f"{points(gold)} points", f"{result.seconds:.0f} s"]
        )
        attributes.append([result.title, *(points(gain[key]) for key in GAIN_KEYS)])
        verdicts.append(f"<p>{result.title}: {verdict(gain, metrics['quick'])}</p>")
    headers = [
        "method",
        "what it trains or optimises",
        "proxy before → after (gain ± paired SE)",
        "gold all-correct before → after",
        "gain ± paired SE",
        "wall time",
    ]
    body = [
        f"<h1>diffalign demo — toy shapes world, {ctx.model} ({type(ctx.family.pipe).__name__})</h1>",
        f"<p class='note'>{'quick' if metrics['quick'] else 'full'} run, seed {metrics['seed']}, "
        f"{metrics['seconds']:.0f} s. The proxy reward <b>{PROXY}</b> (a tiny learned CLIP) is what the methods "
        "optimise; the <b>gold checker</b> reads background, colour and shape from the pixels and is the truth. "
        f"All measurements: {ctx.settings.eval_samples} samples on held-out prompts "
        f"({', '.join(ctx.heldout)}) that no training data contains, with the same seeds for every model.</p>",
        "<h2>Summary</h2>",
        report.table(headers, comparison),
        "<p class='note'>Gains per gold measure, in points ± paired SE (the same seeds before and after; beyond 2 SE "
        "a change is more than noise):</p>",
        report.table(["method", "all three right", "background", "colour", "shape"], attributes),
        *verdicts,
        "<p class='note'>The training curves are validation during training: a few images per held-out prompt at "
        "fixed seeds (their step-0 point is the base model on those images only), so their level differs from the "
        f"tables, which use all {ctx.settings.eval_samples} evaluation samples.</p>",
        "<h2>Base model</h2>",
        report.table(ATTRIBUTE_HEADERS, [result_row("base", base)]),
        report.GALLERY_LEGEND,
        report.sample_gallery(base["images"], base["prompts"], base["gold"].tolist(), base["proxy"].tolist()),
    ]
    for result in results:
        after = result.after
        body += [
            f"<h2>{result.title}</h2>",
            *result.html,
            report.table(
                ATTRIBUTE_HEADERS, [result_row("base", result.baseline(ctx)), result_row(result.title, after)]
            ),
            f"<p class='prompt'>After {result.title} (same seeds as the base samples above)</p>",
            report.sample_gallery(after["images"], after["prompts"], after["gold"].tolist(), after["proxy"].tolist()),
        ]
    return report.page("diffalign demo", "\n".join(body))


def read_curves(metrics_file: Path, extra: tuple[str, ...] = ()) -> dict[str, list[tuple[int, float]]]:
    """Validation curves from a run's metrics.jsonl: proxy reward (val/reward), gold all-correct and mean
    attributes (val/heldout from toy-gold), plus the training metrics named in `extra` (e.g. loss)."""
    names = {"val/reward": "proxy", "val/heldout/all_correct": "gold_all_correct", "val/heldout": "gold_score"}
    names |= {key: key for key in extra}
    curves: dict[str, list[tuple[int, float]]] = {name: [] for name in names.values()}
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        for key, name in names.items():
            if key in record:
                curves[name].append((record["step"], record[key]))
    return curves
