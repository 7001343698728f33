"""`diffalign pairs`: AI-feedback preference pairs in the Pick-a-Pic schema, resumable, split across processes."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest
from clitools import run_cli
from distributed import failure, launch_two_ranks
from PIL import Image

from diffalign.apps.pairs import check_resume_settings, done_prompts, ranked_pairs
from diffalign.errors import UserError

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a white circle", "a red square"]


def test_ranked_pairs_best_vs_worst_and_all():
    assert ranked_pairs([0.1, 0.9, 0.5], all_pairs=False) == [(1, 0)]
    assert ranked_pairs([0.1, 0.9, 0.5], all_pairs=True) == [(1, 2), (1, 0), (2, 0)]
    assert ranked_pairs([0.3, 0.3], all_pairs=False) == []  # a tie is no preference


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


ARGS = ["--model", "tiny-sd", "--reward", "jpeg", "--images-per-prompt", "3"]


@pytest.fixture(scope="module")
def single_run(prompts_file, tmp_path_factory):
    """One uninterrupted single-process run, shared by the tests below."""
    out = tmp_path_factory.mktemp("single") / "pairs.parquet"
    result = run_cli("pairs", *ARGS, "--prompts", str(prompts_file), "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def read(path):
    table = pq.read_table(path)
    return table.to_pylist(), json.loads(table.schema.metadata[b"diffalign"])


def check_rows(rows, images_per_prompt=3):
    for row in rows:
        assert row["caption"] == PROMPTS[row["prompt_index"]]
        assert row["label_0"] in (0.0, 1.0)
        preferred = row["score_0"] if row["label_0"] == 1.0 else row["score_1"]
        other = row["score_1"] if row["label_0"] == 1.0 else row["score_0"]
        assert preferred > other  # the label follows the reward
        for column in ("jpg_0", "jpg_1"):
            assert Image.open(io.BytesIO(row[column])).size == (32, 32)
        base = row["prompt_index"] * images_per_prompt
        assert base <= row["seed_0"] < base + images_per_prompt and row["seed_0"] != row["seed_1"]


def test_pairs_cli_writes_pick_a_pic_rows_with_scores(single_run, prompts_file, tmp_path):
    rows, meta = read(single_run)
    assert [r["prompt_index"] for r in rows] == [0, 1, 2, 3, 4]
    assert meta["reward"] == "jpeg" and meta["images_per_prompt"] == 3
    check_rows(rows)
    assert not single_run.with_name(single_run.name + ".parts").exists()
    # all ranked pairs: 3 images -> up to 3 pairs per prompt
    every = tmp_path / "all.parquet"
    assert run_cli("pairs", *ARGS, "--prompts", str(prompts_file), "--all-pairs", "--out", str(every)).returncode == 0
    every_rows = read(every)[0]
    check_rows(every_rows)
    assert len(every_rows) > len(rows)


def test_pairs_resume_skips_done_prompts_and_matches_a_fresh_run(single_run, prompts_file, tmp_path):
    import pyarrow as pa

    out = tmp_path / "pairs.parquet"
    parts = out.with_name(out.name + ".parts")
    parts.mkdir()
    # an interrupted run: prompts 0-1 done (their part written), nothing merged yet. The part holds a marker caption
    # so the test can tell the resumed run kept it instead of regenerating those prompts.
    done_rows = [{**r, "caption": r["caption"] + " (from part)"} for r in read(single_run)[0] if r["prompt_index"] < 2]
    pq.write_table(pa.Table.from_pylist(done_rows), parts / "part-0000000-rank0.parquet")
    (parts / "done-rank0.jsonl").write_text(json.dumps({"prompts": [0, 1]}) + "\n")
    assert done_prompts(parts) == {0, 1}
    result = run_cli("pairs", *ARGS, "--prompts", str(prompts_file), "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = read(out)[0]
    assert [r["prompt_index"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["caption"].endswith("(from part)") for r in rows] == [True, True, False, False, False]
    assert same_pairs(rows[2:], read(single_run)[0][2:])


def test_resuming_with_other_settings_is_refused(prompts_file, tmp_path):
    parts = tmp_path / "pairs.parquet.parts"
    parts.mkdir()
    settings = {"model": "tiny-sd", "reward": "jpeg", "prompts": "abc"}
    check_resume_settings(parts, settings, is_main=True)  # the first run records its settings
    check_resume_settings(parts, dict(settings), is_main=True)  # the same settings resume
    with pytest.raises(UserError, match=r"other settings \(reward, prompts changed\)"):
        check_resume_settings(parts, {**settings, "reward": "toy-clip", "prompts": "def"}, is_main=True)
    # end to end: an unfinished run made with another reward is neither resumed nor overwritten
    result = run_cli("pairs", *ARGS, "--prompts", str(prompts_file), "--out", str(tmp_path / "pairs.parquet"))
    assert result.returncode == 2 and "holds an unfinished run with other settings" in result.stderr
    assert json.loads((parts / "settings.json").read_text()) == settings and not (tmp_path / "pairs.parquet").exists()


def same_pairs(rows_a, rows_b) -> bool:
    """Same prompts, seeds and labels, and images equal up to float noise of a different sampling batch."""
    import numpy as np

    if len(rows_a) != len(rows_b):
        return False
    for a, b in zip(rows_a, rows_b, strict=True):
        if [a[k] for k in ("caption", "prompt_index", "seed_0", "seed_1", "label_0")] != [
            b[k] for k in ("caption", "prompt_index", "seed_0", "seed_1", "label_0")
        ]:
            return False
        for column in ("jpg_0", "jpg_1"):
            pixels = [np.asarray(Image.open(io.BytesIO(r[column]))).astype(int) for r in (a, b)]
            if np.abs(pixels[0] - pixels[1]).max() > 2:
                return False
    return True


def test_pairs_split_across_two_processes_merge_in_prompt_order(single_run, prompts_file, tmp_path):
    out = tmp_path / "pairs.parquet"
    result = launch_two_ranks(["-m", "diffalign", "pairs", *ARGS, "--prompts", str(prompts_file), "--out", str(out)])
    assert result.returncode == 0, failure(result)
    # each rank did its share only (with a rank-less process state both did all 5 prompts and raced on the files)
    assert "rank 0/2: 3 prompts to do" in result.stderr and "rank 1/2: 2 prompts to do" in result.stderr
    assert same_pairs(read(out)[0], read(single_run)[0])


def test_pairs_input_errors(prompts_file, tmp_path):
    broken = tmp_path / "broken-model"  # a pipeline folder without components: loading it would fail otherwise
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    bad = run_cli(
        "pairs",
        "--model",
        str(broken),
        "--prompts",
        str(prompts_file),
        "--reward",
        "nope",
        "--out",
        str(tmp_path / "p.parquet"),
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: unknown reward 'nope'")
    missing = run_cli(
        "pairs", "--prompts", str(tmp_path / "none.txt"), "--reward", "jpeg", "--out", str(tmp_path / "p.parquet")
    )
    assert missing.returncode == 2 and "prompt file not found" in missing.stderr

    foreign = tmp_path / "mine.parquet"
    foreign.write_bytes(b"PAR1 not ours")
    refused = run_cli("pairs", "--prompts", str(prompts_file), "--reward", "jpeg", "--out", str(foreign))
    assert refused.returncode == 2 and "was not written by `diffalign pairs`" in refused.stderr
    assert foreign.read_bytes() == b"PAR1 not ours"
