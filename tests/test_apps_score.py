"""`diffalign score` and `diffalign rewards`: folders, globs, prompts (sidecar, CSV, JSONL), corrupt files, CSV and
JSONL output checked cell by cell against the reward called directly, errors with exit code 2, and 2 CPU ranks
writing one merged output in input order."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from clitools import run_cli
from distributed import failure, launch_two_ranks
from PIL import Image
from rewardfiles import PROMPTS, quantised_images, write_tiny_clip

TOY_PROMPTS = PROMPTS + ["a green triangle on a grey background", "a cat"]


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("score_clip") / "clip", seed=0)


@pytest.fixture(scope="session")
def clip_reward(clip_dir):
    from diffalign.rewards import load_reward

    return load_reward(f"clip:model={clip_dir}")


def save_png(image: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)


@pytest.fixture
def folder(tmp_path) -> Path:
    """imgs/: four 32x32 PNGs and a 40x48 JPEG-free PNG in a subfolder, each with a sidecar prompt, a corrupt
    PNG (with a prompt too), and a stray text file."""
    root = tmp_path / "imgs"
    small = quantised_images(4, 32, 32, seed=3)
    for i in range(4):
        save_png(small[i], root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(TOY_PROMPTS[i] + "\n")
    save_png(quantised_images(1, 40, 48, seed=4)[0], root / "sub" / "wide.png")
    (root / "sub" / "wide.png.txt").write_text(TOY_PROMPTS[4])
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "broken.txt").write_text("a broken image")
    (root / "notes.md").write_text("not an image")
    return root


SCORED = ["img0.png", "img1.png", "img2.png", "img3.png", "sub/wide.png"]


def expected_scores(reward, root: Path, names: list[str], prompts: list[str]) -> list[float]:
    images = [Image.open(root / name) for name in names]
    return reward.score(images, prompts).tolist()


def run_main(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """The CLI entry point in-process (no interpreter start-up): (exit code, stdout, stderr)."""
    from diffalign.cli import main

    monkeypatch.setattr(sys, "argv", ["diffalign", *args])
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_close_cells(values: list[float], expected: list[float]) -> None:
    assert values == pytest.approx(expected, rel=1e-5, abs=1e-5)


# ------------------------------------------------------------------------------------------------- end to end
def test_score_folder_to_csv_with_sidecars_and_a_corrupt_file(folder, clip_dir, clip_reward, tmp_path):
    out = tmp_path / "scores.csv"
    result = run_cli(
        "score",
        str(folder),
        "--reward",
        f"clip:model={clip_dir}",
        "--batch-size",
        "2",
        "--out",
        str(out),
        "--workers",
        "1",
    )
    assert result.returncode == 0, result.stderr
    assert f"warning: skipping {folder / 'broken.png'}: cannot read image" in result.stderr
    rows = list(csv.reader(out.read_text().splitlines()))
    assert rows[0] == ["path", "prompt", "clip", "total"]
    assert [r[0] for r in rows[1:]] == [str(folder / name) for name in SCORED]  # sorted, recursive, broken skipped
    assert [r[1] for r in rows[1:]] == TOY_PROMPTS  # sidecars: img0.txt and wide.png.txt
    expected = expected_scores(clip_reward, folder, SCORED, TOY_PROMPTS)
    assert_close_cells([float(r[2]) for r in rows[1:]], expected)
    assert [r[3] for r in rows[1:]] == [r[2] for r in rows[1:]]  # a single reward: total == its component
    summary = result.stderr
    assert "scored 5 images with" in summary and "(1 skipped)" in summary
    mean = sum(expected) / len(expected)
    clip_line = next(line for line in summary.splitlines() if line.startswith("clip "))
    assert float(clip_line.split()[1]) == pytest.approx(mean, rel=1e-4)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no temporary file left"


def test_score_mix_to_jsonl_with_a_csv_prompt_mapping(folder, clip_dir, clip_reward, tmp_path, monkeypatch, capsys):
    (folder / "broken.png").unlink()
    mapping = tmp_path / "prompts.csv"
    names = SCORED
    custom = [f"{p} (mapped)" for p in TOY_PROMPTS]
    with mapping.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "caption"])
        for name, prompt in zip(names[:4], custom[:4], strict=True):
            writer.writerow([f"imgs/{name}", prompt])  # relative to the mapping file
    out = tmp_path / "scores.jsonl"
    spec = f"clip:model={clip_dir}:weight=2,jpeg=0.5"
    code, _, err = run_main(
        ["score", str(folder), "--reward", spec, "--prompts", str(mapping), "--out", str(out), "--workers", "0"],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [list(r) for r in rows] == [["path", "prompt", "clip", "jpeg", "total"]] * 5
    prompts = custom[:4] + [TOY_PROMPTS[4]]  # wide.png is not in the mapping: its sidecar is used
    assert [r["prompt"] for r in rows] == prompts
    clip = expected_scores(clip_reward, folder, names, prompts)
    from diffalign.rewards import load_reward

    jpeg = expected_scores(load_reward("jpeg"), folder, names, prompts)
    assert_close_cells([r["clip"] for r in rows], clip)
    assert_close_cells([r["jpeg"] for r in rows], jpeg)
    assert_close_cells([r["total"] for r in rows], [2 * c + 0.5 * j for c, j in zip(clip, jpeg, strict=True)])
    assert "(0 skipped)" in err and "wrote 5 rows" in err


def test_prompt_for_all_glob_and_explicit_files_csv_on_stdout(folder, monkeypatch, capsys):
    args = [
        "score",
        str(folder / "img*.png"),
        str(folder / "img0.png"),
        str(folder / "sub" / "wide.png"),
        "--reward",
        "jpeg",
        "--prompt",
        "anything",
        "--workers",
        "0",
    ]
    code, out, err = run_main(args, monkeypatch, capsys)
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["path"] for r in rows] == [str(folder / n) for n in SCORED]  # repeats removed, input order kept
    assert {r["prompt"] for r in rows} == {"anything"}


def test_prompts_from_jsonl_like_generate_writes_it(folder, tmp_path, monkeypatch, capsys):
    (folder / "broken.png").unlink()
    for sidecar in folder.rglob("*.txt"):
        sidecar.unlink()
    lines = [json.dumps({"file": name, "prompt": f"p{i}", "seed": i}) for i, name in enumerate(SCORED)]
    (folder / "generate.jsonl").write_text("\n".join(lines) + "\n")
    jsonl = str(folder / "generate.jsonl")
    code, out, err = run_main(
        ["score", str(folder), "--reward", "toy-gold", "--prompts", jsonl, "--workers", "0"], monkeypatch, capsys
    )
    assert code == 2 and "toy-gold" in err, "prompts reach the reward (and toy-gold refuses non-world prompts)"
    code, out, err = run_main(
        ["score", str(folder), "--reward", "jpeg", "--prompts", str(folder / "generate.jsonl"), "--workers", "0"],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    assert [r["prompt"] for r in csv.DictReader(io.StringIO(out))] == [f"p{i}" for i in range(5)]


# ----------------------------------------------------------------------------------------------------- errors
def one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_strict_makes_a_corrupt_image_an_error_and_writes_nothing(folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "scores.csv"
    code, _, err = run_main(
        ["score", str(folder), "--reward", "jpeg", "--strict", "--out", str(out), "--workers", "1"], monkeypatch, capsys
    )
    one_line_error(code, err, str(folder / "broken.png"), "cannot read image")
    assert list(tmp_path.iterdir()) == [folder], "no output and no temporary file"


def test_missing_prompt_is_named_before_any_model_loads(folder, monkeypatch, capsys):
    (folder / "img2.txt").unlink()
    # hpsv2 cannot load offline: the prompt error must come first
    code, _, err = run_main(["score", str(folder), "--reward", "hpsv2"], monkeypatch, capsys)
    one_line_error(code, err, f"no prompt for image {folder / 'img2.png'}", "img2.txt")
    code, _, err = run_main(["score", str(folder), "--reward", "jpeg", "--workers", "0"], monkeypatch, capsys)
    assert code == 0, "jpeg needs no prompts"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["{empty}"], "no images found"),
        (["{empty}/nothing-*.png"], "no images found"),
        (["{empty}/missing"], "does not exist"),
        (["{folder}", "--out", "{empty}/scores.txt"], "use a .csv or .jsonl"),
        (["{folder}", "--prompt", "x", "--prompts", "{empty}/p.csv"], "either --prompt or --prompts"),
        (["{folder}", "--prompts", "{empty}/p.txt"], "cannot read prompts file"),
        (["{folder}", "--reward", "hpsv2x"], "unknown reward 'hpsv2x'"),
        (["{folder}", "--out", "{empty}/notes.csv"], "notes.csv exists and is not a score output"),
    ],
)
def test_bad_input_exits_2(args, fragment, folder, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.csv").write_text("name,age\nann,3\n")  # a user's file: never overwritten
    args = [a.format(empty=empty, folder=folder) for a in args]
    if "--reward" not in args:
        args += ["--reward", "jpeg"]
    code, _, err = run_main(["score", *args], monkeypatch, capsys)
    one_line_error(code, err, fragment)
    assert (empty / "notes.csv").read_text() == "name,age\nann,3\n"


def test_every_image_unreadable_is_an_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "a.png").write_bytes(b"junk")
    code, _, err = run_main(["score", str(tmp_path), "--reward", "jpeg", "--workers", "0"], monkeypatch, capsys)
    one_line_error(code, err, "none of the 1 images could be read")


def test_rewards_command_lists_every_reward(monkeypatch, capsys):
    from diffalign.rewards import REWARDS

    code, out, err = run_main(["rewards"], monkeypatch, capsys)
    assert code == 0, err
    for name, cls in REWARDS.items():
        line = next(line for line in out.splitlines() if f" {name} " in line)
        assert (" yes " in line) == cls.differentiable
    assert "xswu/HPSv2" in out and "yuvalkirstain/PickScore_v1" in out and "THUDM/ImageReward" in out


# ----------------------------------------------------------------------------------------------- two processes
def test_two_ranks_write_one_merged_output_in_input_order(folder, clip_dir, tmp_path, monkeypatch, capsys):
    merged, single = tmp_path / "merged.csv", tmp_path / "single.csv"
    args = [str(folder), "--reward", f"clip:model={clip_dir},jpeg=0.1", "--batch-size", "2", "--workers", "1"]
    result = launch_two_ranks(["-m", "diffalign", "score", *args, "--out", str(merged)])
    assert result.returncode == 0, failure(result)
    # input order: broken, img0, img1, img2, img3, sub/wide -> rank 0 gets broken, img1, img3; rank 1 the others
    assert "rank 0/2: scored 2 images (1 skipped)" in result.stderr
    assert "rank 1/2: scored 3 images (0 skipped)" in result.stderr
    assert result.stderr.count("skipping") == 1 and "(1 skipped)" in result.stderr
    code, _, err = run_main(["score", *args, "--out", str(single)], monkeypatch, capsys)  # one process, in-process
    assert code == 0, err
    merged_rows = list(csv.reader(merged.read_text().splitlines()))
    single_rows = list(csv.reader(single.read_text().splitlines()))
    assert [r[:2] for r in merged_rows] == [r[:2] for r in single_rows]
    assert len(merged_rows) == 1 + len(SCORED)
    for got, want in zip(merged_rows[1:], single_rows[1:], strict=True):
        assert_close_cells([float(v) for v in got[2:]], [float(v) for v in want[2:]])


def test_decode_image_matches_pil_for_every_format(tmp_path):
    import numpy as np

    from diffalign.data.images import decode_image

    array = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    images = {
        "rgb.png": Image.fromarray(array),
        "gray.png": Image.fromarray(array[..., 0]),
        "rgba.png": Image.fromarray(np.dstack([array, array[..., :1]])),
        "palette.gif": Image.fromarray(array).convert("P"),
        "photo.jpg": Image.fromarray(array),
        "bitmap.bmp": Image.fromarray(array),
        "scan.tiff": Image.fromarray(array),
        "web.webp": Image.fromarray(array),
    }
    for name, image in images.items():
        image.save(tmp_path / name)
        with Image.open(tmp_path / name) as reopened:
            expected = torch.from_numpy(np.asarray(reopened.convert("RGB")).copy()).permute(2, 0, 1)
        decoded = decode_image(tmp_path / name)
        assert decoded.dtype == torch.uint8 and torch.equal(decoded, expected), name
