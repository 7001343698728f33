"""Rewards: each real reward loads a TINY checkpoint written in its published file format through the real loader,
and is checked for finite, batch-invariant scores, image gradients, PIL == tensor path, and agreement with a
reference computation written from the peer code (transformers/open_clip model calls, or the BLIP math for
ImageReward). Also: the weighted mix, the spec language and its errors, preprocessing, jpeg and the toy rewards."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from rewardfiles import CLIP_MEAN, CLIP_STD, PROMPTS, WORDS, quantised_images, write_tiny_clip

from diffalign.errors import UserError

OPEN_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


# ------------------------------------------------------------------------------------- tiny checkpoint writers
def write_open_clip_arch(folder: Path) -> Path:
    """An open_clip `local-dir:` folder holding only the (tiny) architecture: open_clip_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPEN_CLIP_CFG, "preprocess_cfg": {}}))
    return folder


def tiny_open_clip(arch: Path, seed: int):
    import open_clip

    torch.manual_seed(seed)
    return open_clip.create_model(f"local-dir:{arch}").eval()


def write_hps_checkpoints(folder: Path, arch: Path) -> Path:
    """HPS_v2_compressed.pt and HPS_v2.1_compressed.pt as published: {'state_dict': open_clip CLIP state dict}."""
    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in ((1, "HPS_v2_compressed.pt"), (2, "HPS_v2.1_compressed.pt")):
        torch.save({"state_dict": tiny_open_clip(arch, seed).state_dict()}, folder / name)
    return folder


def head_state_dict(widths: list[int], seed: int) -> dict[str, torch.Tensor]:
    """The published MLP head keys layers.{0,2,4,6,7}.{weight,bias} (Linear/Dropout Sequential)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), zip(widths[:-1], widths[1:], strict=False), strict=True):
        state[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in, generator=g) / math.sqrt(fan_in)
        state[f"layers.{index}.bias"] = torch.randn(fan_out, generator=g) * 0.1
    return state


def write_aesthetic_head(folder: Path, input_width: int = 16) -> Path:
    """sac+logos+ava1-l14-linearMSE.pth as the training script saves it: torch.save(model.state_dict())."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head_state_dict([input_width, 24, 16, 8, 4, 1], seed=3), path)
    return path


IR = dict(width=64, depth=2, patch=8, image=32, hidden=32, layers=2, intermediate=64, positions=40, embed=16)
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS


def imagereward_state_dict(seed: int = 4) -> dict[str, torch.Tensor]:
    """ImageReward.pt keys as BLIP_Pretrain (vit.py VisionTransformer + med.py BertModel) and ImageReward.mlp have
    them, including the extra vision_proj/text_proj and the persistent position_ids buffer; tiny widths."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def norm(prefix: str, width: int) -> None:
        state[f"{prefix}.weight"], state[f"{prefix}.bias"] = 1 + rnd(width), rnd(width)

    def linear(prefix: str, fan_in: int, fan_out: int) -> None:
        state[f"{prefix}.weight"], state[f"{prefix}.bias"] = rnd(fan_out, fan_in, std=fan_in**-0.5), rnd(fan_out)

    w, h, vocab = IR["width"], IR["hidden"], len(BERT_VOCAB) + 2  # + [DEC], [ENC]
    state: dict[str, torch.Tensor] = {}
    v = "blip.visual_encoder."
    state[v + "cls_token"] = rnd(1, 1, w)
    state[v + "pos_embed"] = rnd(1, (IR["image"] // IR["patch"]) ** 2 + 1, w)
    state[v + "patch_embed.proj.weight"] = rnd(w, 3, IR["patch"], IR["patch"], std=0.05)
    state[v + "patch_embed.proj.bias"] = rnd(w)
    for i in range(IR["depth"]):
        b = f"{v}blocks.{i}."
        norm(b + "norm1", w)
        linear(b + "attn.qkv", w, 3 * w)
        linear(b + "attn.proj", w, w)
        norm(b + "norm2", w)
        linear(b + "mlp.fc1", w, 4 * w)
        linear(b + "mlp.fc2", 4 * w, w)
    norm(v + "norm", w)
    t = "blip.text_encoder."
    state[t + "embeddings.position_ids"] = torch.arange(IR["positions"])[None]
    state[t + "embeddings.word_embeddings.weight"] = rnd(vocab, h)
    state[t + "embeddings.position_embeddings.weight"] = rnd(IR["positions"], h)
    norm(t + "embeddings.LayerNorm", h)
    for i in range(IR["layers"]):
        e = f"{t}encoder.layer.{i}."
        for part, kv_width in (("attention", h), ("crossattention", w)):
            linear(e + f"{part}.self.query", h, h)
            linear(e + f"{part}.self.key", kv_width, h)
            linear(e + f"{part}.self.value", kv_width, h)
            linear(e + f"{part}.output.dense", h, h)
            norm(e + f"{part}.output.LayerNorm", h)
        linear(e + "intermediate.dense", h, IR["intermediate"])
        linear(e + "output.dense", IR["intermediate"], h)
        norm(e + "output.LayerNorm", h)
    linear("blip.vision_proj", w, IR["embed"])
    linear("blip.text_proj", h, IR["embed"])
    state.update({f"mlp.{k}": val for k, val in head_state_dict([h, 24, 16, 8, 4, 1], seed=5).items()})
    return state


def write_imagereward(folder: Path) -> Path:
    """ImageReward.pt + med_config.json (BLIP's BertConfig with cross-attention) + a bert vocab.txt tokenizer folder."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(imagereward_state_dict(), folder / "ImageReward.pt")
    med = {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": IR["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": IR["intermediate"],
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": IR["positions"],
        "model_type": "bert",
        "num_attention_heads": 2,
        "num_hidden_layers": IR["layers"],
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": len(BERT_VOCAB) + 2,
        "encoder_width": IR["width"],
        "add_cross_attention": True,
    }
    (folder / "med_config.json").write_text(json.dumps(med))
    tokenizer = folder / "bert"
    tokenizer.mkdir(exist_ok=True)
    (tokenizer / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    return folder


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """All tiny checkpoints, written once per session in a temporary folder."""
    root = tmp_path_factory.mktemp("tiny_rewards")
    arch = write_open_clip_arch(root / "open_clip_arch")
    open_clip_full = write_open_clip_arch(root / "open_clip_full")
    torch.save(tiny_open_clip(arch, seed=7).state_dict(), open_clip_full / "open_clip_pytorch_model.bin")
    pick_processor = write_tiny_clip(root / "pick_processor", seed=8, mean=CLIP_MEAN, std=CLIP_STD)
    pick_model = root / "pick_model"
    write_tiny_clip(pick_model, seed=9)
    for file in pick_model.iterdir():  # the model repo has weights only; the processor comes from elsewhere
        if file.name not in ("config.json", "model.safetensors"):
            file.unlink()
    return {
        "clip": write_tiny_clip(root / "clip", seed=0),
        "open_clip_arch": arch,
        "open_clip_full": open_clip_full,
        "hps": write_hps_checkpoints(root / "hps", arch),
        "aesthetic_clip": write_tiny_clip(root / "aesthetic_clip", seed=10, mean=CLIP_MEAN, std=CLIP_STD),
        "aesthetic_head": write_aesthetic_head(root / "aesthetic_head"),
        "pick_model": pick_model,
        "pick_processor": pick_processor,
        "imagereward": write_imagereward(root / "imagereward"),
    }


def specs(tiny: dict[str, Path]) -> dict[str, str]:
    """Spec of each real reward on its tiny checkpoint (local paths only)."""
    return {
        "clip": f"clip:model={tiny['clip']}",
        "clip-open_clip": f"clip:model=local-dir:{tiny['open_clip_full']}",
        "hpsv2": f"hpsv2:checkpoint={tiny['hps']}:arch=local-dir:{tiny['open_clip_arch']}",
        "hpsv2-2.0": f"hpsv2:version=2.0:checkpoint={tiny['hps'] / 'HPS_v2_compressed.pt'}"
        f":arch=local-dir:{tiny['open_clip_arch']}",
        "aesthetic": f"aesthetic:clip={tiny['aesthetic_clip']}:head={tiny['aesthetic_head']}",
        "pickscore": f"pickscore:model={tiny['pick_model']}:processor={tiny['pick_processor']}",
        "imagereward": f"imagereward:checkpoint={tiny['imagereward']}:tokenizer={tiny['imagereward'] / 'bert'}",
        "jpeg": "jpeg",
    }


_LOADED: dict[str, object] = {}


def load(tiny: dict[str, Path], key: str):
    """The reward `key` of `specs`, loaded once per session through load_reward."""
    from diffalign.rewards import load_reward

    if key not in _LOADED:
        _LOADED[key] = load_reward(specs(tiny)[key])
    return _LOADED[key]


REAL = ["clip", "clip-open_clip", "hpsv2", "hpsv2-2.0", "aesthetic", "pickscore", "imagereward", "jpeg"]


# ------------------------------------------------------------------------------------------- common behaviour
@pytest.mark.parametrize("key", REAL)
def test_scores_are_finite_and_batch_invariant(tiny, key):
    reward = load(tiny, key)
    images = quantised_images()
    batch = reward(images, PROMPTS)
    assert batch.shape == (3,) and batch.dtype == torch.float32
    assert torch.isfinite(batch).all()
    one_by_one = torch.cat([reward(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(3)])
    # 1e-5, relative for scores on a x100 scale (float32 kernels differ with the batch size by ~1e-7 of a cosine)
    torch.testing.assert_close(batch, one_by_one, atol=1e-5, rtol=1e-5)
    assert batch.std() > 0, "different images and prompts get different scores"


@pytest.mark.parametrize("key", REAL)
def test_gradient_reaches_the_pixels_unless_declared_non_differentiable(tiny, key):
    reward = load(tiny, key)
    images = quantised_images().requires_grad_(True)
    scores = reward(images, PROMPTS)
    if not reward.differentiable:
        assert not scores.requires_grad
        return
    (grad,) = torch.autograd.grad(scores.sum(), images)
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in reward.parameters()), "rewards are frozen"


@pytest.mark.parametrize("key", REAL)
def test_pil_and_numpy_paths_agree_with_the_tensor_path(tiny, key):
    reward = load(tiny, key)
    images = quantised_images()
    expected = reward(images, PROMPTS)
    arrays = [(im.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy() for im in images]
    torch.testing.assert_close(reward.score([Image.fromarray(a) for a in arrays], PROMPTS), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(reward.score(arrays, PROMPTS), expected, atol=1e-5, rtol=0)


def test_mixed_sizes_are_scored_in_size_groups(tiny):
    reward = load(tiny, "clip")
    small, large = quantised_images(2, 32, 32, seed=1), quantised_images(1, 50, 36, seed=2)
    mixed = reward.score([small[0], large[0], small[1]], PROMPTS)
    expected = torch.stack(
        [reward(small[:1], PROMPTS[:1])[0], reward(large, PROMPTS[1:2])[0], reward(small[1:], PROMPTS[2:])[0]]
    )
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=0)


def test_a_reward_stays_in_eval_mode(tiny):
    reward = load(tiny, "aesthetic")
    reward.train()
    assert not any(m.training for m in reward.modules())
    images = quantised_images()
    torch.testing.assert_close(reward(images, PROMPTS), reward(images, PROMPTS))  # dropout stays off


# ----------------------------------------------------------------------------- agreement with the peer code paths
def test_clip_is_100_cosine_of_the_transformers_model_with_its_own_processor(tiny):
    from transformers import CLIPModel, CLIPProcessor

    reward = load(tiny, "clip")
    images = quantised_images(3, 32, 32)  # native size: the processor only rescales and normalises
    model, processor = CLIPModel.from_pretrained(tiny["clip"]), CLIPProcessor.from_pretrained(tiny["clip"])
    pil = [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in images]
    inputs = processor(text=PROMPTS, images=pil, return_tensors="pt", padding="max_length", max_length=77)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs.pixel_values).pooler_output
        text = model.get_text_features(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).pooler_output
    expected = 100 * F.cosine_similarity(image, text)
    torch.testing.assert_close(reward(images, PROMPTS), expected, atol=1e-4, rtol=0)


def test_clip_preprocessing_matches_the_transformers_image_processor_on_any_size(tiny):
    from transformers import CLIPImageProcessor

    preprocess = load(tiny, "clip").encoder.preprocess
    processor = CLIPImageProcessor.from_pretrained(tiny["clip"])
    for height, width in ((45, 61), (61, 45), (33, 64)):
        images = torch.rand(2, 3, height, width)
        expected = processor(images=list(images), do_rescale=False, return_tensors="pt").pixel_values
        torch.testing.assert_close(preprocess(images), expected, atol=1e-5, rtol=0)


def test_pickscore_is_logit_scale_times_cosine_with_the_separate_processor(tiny):
    from transformers import CLIPModel, CLIPProcessor

    reward = load(tiny, "pickscore")
    images = quantised_images(3, 32, 32)
    model = CLIPModel.from_pretrained(tiny["pick_model"])
    processor = CLIPProcessor.from_pretrained(tiny["pick_processor"])
    pil = [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in images]
    inputs = processor(text=PROMPTS, images=pil, return_tensors="pt", padding="max_length", max_length=77)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs.pixel_values).pooler_output
        text = model.get_text_features(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).pooler_output
    expected = model.logit_scale.exp() * F.cosine_similarity(image, text)
    torch.testing.assert_close(reward(images, PROMPTS), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("key", "file", "seed"), [("hpsv2", "HPS_v2.1_compressed.pt", 2), ("hpsv2-2.0", "HPS_v2_compressed.pt", 1)]
)
def test_hpsv2_is_the_open_clip_cosine_of_the_checkpoint_weights(tiny, key, file, seed):
    import open_clip

    reward = load(tiny, key)
    model = tiny_open_clip(tiny["open_clip_arch"], seed=seed)
    images = quantised_images(3, 32, 32)
    tokens = open_clip.get_tokenizer(f"local-dir:{tiny['open_clip_arch']}")(PROMPTS)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        image = model.encode_image((images - mean) / std, normalize=True)
        text = model.encode_text(tokens, normalize=True)
    torch.testing.assert_close(reward(images, PROMPTS), (image * text).sum(-1), atol=1e-5, rtol=0)


def test_aesthetic_is_the_head_on_the_normalised_clip_image_embedding(tiny):
    from transformers import CLIPModel

    reward = load(tiny, "aesthetic")
    images = quantised_images(3, 32, 32)
    model = CLIPModel.from_pretrained(tiny["aesthetic_clip"])
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    state = torch.load(tiny["aesthetic_head"], weights_only=True)
    with torch.no_grad():
        x = model.get_image_features(pixel_values=(images - mean) / std).pooler_output
        x = x / x.norm(dim=-1, keepdim=True)
        for index in (0, 2, 4, 6, 7):  # Linear layers, no activations (dropout is off at inference)
            x = F.linear(x, state[f"layers.{index}.weight"], state[f"layers.{index}.bias"])
    torch.testing.assert_close(reward(images, ["ignored"] * 3), x.squeeze(-1), atol=1e-5, rtol=0)


def blip_reference_score(
    state: dict[str, torch.Tensor], pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """ImageReward.score written from BLIP's vit.py / med.py math directly on the checkpoint tensors."""
    s = state
    w, heads_v, heads_t = IR["width"], IR["width"] // 64, 2

    def attention(q, k, v, heads, bias=None):
        b, n, d = q.shape
        split = lambda x: x.reshape(b, x.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
        scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads)
        if bias is not None:
            scores = scores + bias
        return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, d)

    v = "blip.visual_encoder."
    x = F.conv2d(pixels, s[v + "patch_embed.proj.weight"], s[v + "patch_embed.proj.bias"], stride=IR["patch"])
    x = torch.cat([s[v + "cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1) + s[v + "pos_embed"]
    for i in range(IR["depth"]):
        b = f"{v}blocks.{i}."
        h = F.layer_norm(x, (w,), s[b + "norm1.weight"], s[b + "norm1.bias"], eps=1e-6)
        q, k, val = F.linear(h, s[b + "attn.qkv.weight"], s[b + "attn.qkv.bias"]).chunk(3, dim=-1)
        x = x + F.linear(attention(q, k, val, heads_v), s[b + "attn.proj.weight"], s[b + "attn.proj.bias"])
        h = F.layer_norm(x, (w,), s[b + "norm2.weight"], s[b + "norm2.bias"], eps=1e-6)
        h = F.gelu(F.linear(h, s[b + "mlp.fc1.weight"], s[b + "mlp.fc1.bias"]))
        x = x + F.linear(h, s[b + "mlp.fc2.weight"], s[b + "mlp.fc2.bias"])
    image = F.layer_norm(x, (w,), s[v + "norm.weight"], s[v + "norm.bias"], eps=1e-6)

    t = "blip.text_encoder."
    lin = lambda p, z: F.linear(z, s[p + ".weight"], s[p + ".bias"])  # noqa: E731
    ln = lambda p, z: F.layer_norm(z, (z.shape[-1],), s[p + ".weight"], s[p + ".bias"], eps=1e-12)  # noqa: E731
    e = s[t + "embeddings.word_embeddings.weight"][ids] + s[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    e = ln(t + "embeddings.LayerNorm", e)
    bias = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for i in range(IR["layers"]):
        p = f"{t}encoder.layer.{i}."
        a = attention(
            lin(p + "attention.self.query", e),
            lin(p + "attention.self.key", e),
            lin(p + "attention.self.value", e),
            heads_t,
            bias,
        )
        a = ln(p + "attention.output.LayerNorm", lin(p + "attention.output.dense", a) + e)
        c = attention(
            lin(p + "crossattention.self.query", a),
            lin(p + "crossattention.self.key", image),
            lin(p + "crossattention.self.value", image),
            heads_t,
        )
        c = ln(p + "crossattention.output.LayerNorm", lin(p + "crossattention.output.dense", c) + a)
        e = ln(p + "output.LayerNorm", lin(p + "output.dense", F.gelu(lin(p + "intermediate.dense", c))) + c)
    x = e[:, 0]
    for index in (0, 2, 4, 6, 7):
        x = lin(f"mlp.layers.{index}", x)
    return ((x - 0.16717362830052426) / 1.0333394966054072).squeeze(-1)


def test_aesthetic_crops_like_torchvision_center_crop(tiny):
    """The official predictor preprocesses with clip.load's torchvision CenterCrop, which rounds the offset: for a
    35-row image cropped to 32 it starts at row round(1.5) = 2 (transformers' processors floor it to row 1)."""
    reward = load(tiny, "aesthetic")
    assert reward.preprocess.crop == (32, 32) and reward.preprocess.resize == 32
    images = torch.rand(2, 3, 35, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(reward(images, ["x"] * 2), reward(images[:, :, 2:34, :], ["x"] * 2), atol=1e-6, rtol=0)
    assert (reward(images, ["x"] * 2) - reward(images[:, :, 1:33, :], ["x"] * 2)).abs().max() > 1e-6


def test_default_aesthetic_head_must_be_the_published_file(tiny, monkeypatch):
    """The default head comes from a third-party mirror: its sha256 is checked against the official file's."""
    import diffalign.rewards.aesthetic as aesthetic
    from diffalign.errors import UserError
    from diffalign.rewards import load_reward

    monkeypatch.setattr(aesthetic, "resolve_file", lambda *args: tiny["aesthetic_head"])
    with pytest.raises(UserError, match="not the published file"):
        load_reward(f"aesthetic:clip={tiny['aesthetic_clip']}")
    load_reward(f"aesthetic:clip={tiny['aesthetic_clip']}:head={tiny['aesthetic_head']}")  # a given file: used as is


def test_processor_config_resampling_without_torch_equivalent_is_an_error(tiny, tmp_path):
    import shutil

    from diffalign.errors import UserError
    from diffalign.rewards import load_reward

    folder = tmp_path / "clip"
    shutil.copytree(tiny["clip"], folder)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps(config | {"resample": 1}))  # PIL LANCZOS
    with pytest.raises(UserError, match="resample=1"):
        load_reward(f"clip:model={folder}")


def test_a_clip_folder_without_preprocessor_config_warns_which_defaults_it_uses(tiny, tmp_path, caplog):
    import shutil

    from diffalign.rewards import load_reward

    folder = tmp_path / "clip"
    shutil.copytree(tiny["clip"], folder)
    (folder / "preprocessor_config.json").unlink()
    with caplog.at_level(logging.WARNING):
        reward = load_reward(f"clip:model={folder}")
    assert "no preprocessor_config.json" in caplog.text and "CLIP defaults" in caplog.text
    assert reward.encoder.preprocess.mean == CLIP_MEAN


def test_imagereward_matches_the_blip_math_on_the_published_keys(tiny):
    from transformers import BertTokenizer

    reward = load(tiny, "imagereward")
    images = quantised_images(3, 32, 32)
    state = torch.load(tiny["imagereward"] / "ImageReward.pt", weights_only=True)
    tokenizer = BertTokenizer.from_pretrained(tiny["imagereward"] / "bert")
    tokens = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = blip_reference_score(state, (images - mean) / std, tokens.input_ids, tokens.attention_mask)
    torch.testing.assert_close(reward(images, PROMPTS), expected, atol=1e-4, rtol=0)


def test_imagereward_text_is_truncated_at_35_tokens(tiny):
    reward = load(tiny, "imagereward")
    images = quantised_images(1, 32, 32)
    base = "a red circle on a white background " * 5  # 35 words: [CLS] + 33 of them + [SEP] fill the window
    long = base + "with a cat"  # the extra words fall beyond the 35-token window
    torch.testing.assert_close(
        reward(images, [base.strip() + " blue"]), reward(images, [base.strip() + " green"]), atol=0, rtol=0
    )
    assert not torch.equal(reward(images, ["a red circle"]), reward(images, [long]))


# ----------------------------------------------------------------------------------------------------- jpeg, toy
def test_jpeg_is_minus_kilobytes_at_quality_95(tiny):
    import io

    reward = load(tiny, "jpeg")
    images = quantised_images()
    sizes = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(buffer, "JPEG", quality=95)
        sizes.append(len(buffer.getvalue()) / 1000)
    assert reward(images, PROMPTS).tolist() == pytest.approx([-s for s in sizes])
    flat = torch.full((1, 3, 40, 48), 0.5)
    assert reward(flat, [""]) > reward(images[:1], [""]), "a flat image compresses better than a textured one"


def test_toy_gold_wraps_the_gold_checker():
    gold = pytest.importorskip("diffalign.gym.gold", reason="diffalign/gym/gold.py is not written yet")
    from diffalign.gym.world import generate
    from diffalign.rewards import load_reward

    images, prompts = generate(4, seed=0)
    reward = load_reward("toy-gold")
    assert not reward.differentiable
    torch.testing.assert_close(reward(images, prompts), gold.gold_score(images, prompts))
    assert reward(images, prompts).mean() > 0.9, "the world's own images mostly pass the gold check"
    shuffled = prompts[1:] + prompts[:1]
    assert reward(images, shuffled).mean() < reward(images, prompts).mean()
    with pytest.raises(UserError, match="toy-gold"):
        reward(images[:1], ["a photo of a dog"])


def test_toy_clip_loads_the_toy_reward_folder_and_reads_its_32px_preprocessing(tiny, monkeypatch, tmp_path):
    import shutil

    from diffalign import hub
    from diffalign.rewards import load_reward

    monkeypatch.setattr(hub, "ASSETS_DIR", tmp_path)
    with pytest.raises(UserError, match="make assets"):
        load_reward("toy-clip")
    shutil.copytree(tiny["clip"], tmp_path / "toy" / "reward")
    config = json.loads((tmp_path / "toy" / "reward" / "preprocessor_config.json").read_text())
    config["image_mean"], config["image_std"] = [0.2, 0.3, 0.4], [0.5, 0.6, 0.7]
    (tmp_path / "toy" / "reward" / "preprocessor_config.json").write_text(json.dumps(config))
    reward = load_reward("toy-clip")
    preprocess = reward.encoder.preprocess
    assert (preprocess.resize, preprocess.crop) == (32, (32, 32))
    assert preprocess.mean == (0.2, 0.3, 0.4) and preprocess.std == (0.5, 0.6, 0.7)
    images = quantised_images(3, 32, 32)
    assert torch.isfinite(reward(images, PROMPTS)).all()
    assert not torch.allclose(reward(images, PROMPTS), load(tiny, "clip")(images, PROMPTS)), "own mean/std are used"


# ---------------------------------------------------------------------------------------------- weighted mixes
def test_weighted_mix_is_the_weighted_sum_of_its_components(tiny):
    from diffalign.rewards import WeightedSum, load_reward

    spec = f"clip:model={tiny['clip']}:weight=2,jpeg=0.5,clip:model={tiny['clip']}:scale=1:weight=-3"
    reward = load_reward(spec)
    assert isinstance(reward, WeightedSum) and not reward.differentiable  # jpeg is not
    images = quantised_images()
    parts = reward.components(images, PROMPTS)
    assert list(parts) == ["clip", "jpeg", "clip#2"]
    clip, jpeg = load(tiny, "clip")(images, PROMPTS), load(tiny, "jpeg")(images, PROMPTS)
    torch.testing.assert_close(parts["clip"], clip)
    torch.testing.assert_close(parts["jpeg"], jpeg)
    torch.testing.assert_close(parts["clip#2"], clip / 100, atol=1e-6, rtol=1e-5)
    expected = 2 * clip + 0.5 * jpeg - 3 * clip / 100
    torch.testing.assert_close(reward(images, PROMPTS), expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(reward.combine(parts), reward(images, PROMPTS))


def test_a_differentiable_mix_backpropagates_through_every_part(tiny):
    from diffalign.rewards import load_reward

    reward = load_reward(
        f"aesthetic:clip={tiny['aesthetic_clip']}:head={tiny['aesthetic_head']}:weight=1.5,"
        f"clip:model={tiny['clip']}:weight=0.01"
    )
    assert reward.differentiable
    images = quantised_images().requires_grad_(True)
    (grad,) = torch.autograd.grad(reward(images, PROMPTS).sum(), images)
    (grad_a,) = torch.autograd.grad(load(tiny, "aesthetic")(images, PROMPTS).sum(), images)
    (grad_c,) = torch.autograd.grad(load(tiny, "clip")(images, PROMPTS).sum(), images)
    torch.testing.assert_close(grad, 1.5 * grad_a + 0.01 * grad_c, atol=1e-6, rtol=1e-4)


def test_a_single_unweighted_term_is_the_reward_itself(tiny):
    from diffalign.rewards import REWARDS, load_reward

    assert type(load_reward("jpeg")) is REWARDS["jpeg"]
    weighted = load_reward("jpeg=3")
    images = quantised_images()
    torch.testing.assert_close(weighted(images, PROMPTS), 3 * load(tiny, "jpeg")(images, PROMPTS))


# --------------------------------------------------------------------------------------------- spec language
def test_user_reward_by_dotted_path(tmp_path, monkeypatch):
    from diffalign.rewards import load_reward

    (tmp_path / "my_rewards.py").write_text(
        "import torch\nfrom diffalign.rewards import Reward\n\n"
        "class Brightness(Reward):\n"
        "    name = 'brightness'\n"
        "    def __init__(self, gain: float = 1.0):\n"
        "        super().__init__()\n"
        "        self.gain = gain\n"
        "    def forward(self, images, prompts):\n"
        "        return self.gain * images.mean(dim=(1, 2, 3))\n"
        "class NotAReward:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    images = quantised_images()
    reward = load_reward("my_rewards:Brightness:gain=2")
    torch.testing.assert_close(reward(images, PROMPTS), 2 * images.mean(dim=(1, 2, 3)))
    mix = load_reward("my_rewards:Brightness=0.5,jpeg=1")
    assert list(mix.components(images, PROMPTS)) == ["brightness", "jpeg"]
    with pytest.raises(UserError, match="not a subclass of diffalign.rewards.Reward"):
        load_reward("my_rewards:NotAReward")
    with pytest.raises(UserError, match="has no 'Missing'"):
        load_reward("my_rewards:Missing")
    with pytest.raises(UserError, match="cannot import module 'no_such_pkg.mod'"):
        load_reward("no_such_pkg.mod:Reward")


def test_unknown_reward_lists_the_registered_names():
    from diffalign.rewards import REWARDS, load_reward

    with pytest.raises(UserError) as error:
        load_reward("hpsv3")
    message = str(error.value)
    assert "unknown reward 'hpsv3'" in message and "\n" not in message
    for name in REWARDS:
        assert name in message
    assert set(REWARDS) >= {"clip", "aesthetic", "hpsv2", "pickscore", "imagereward", "jpeg", "toy-clip", "toy-gold"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("clip:modle=x", "reward 'clip' has no option 'modle' (options: model, pretrained, scale)"),
        ("jpeg:quality=high", "option quality='high' is not a valid int"),
        ("jpeg=heavy", "weight 'heavy' is not a number"),
        ("jpeg:oops", "'oops' is not an option of the form key=value"),
        ("jpeg,,clip", "empty reward spec"),
        ("hpsv2:version=3.0", "unknown version '3.0'"),
        ("jpeg:quality=90:quality=80", "option 'quality' is given twice"),
    ],
)
def test_bad_specs_are_one_line_user_errors(spec, message):
    from diffalign.rewards import load_reward

    with pytest.raises(UserError) as error:
        load_reward(spec)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_option_values_may_contain_colons():
    from diffalign.rewards import parse_spec

    (term,) = parse_spec("clip:model=hf-hub:laion/CLIP-ViT-B-32:scale=1")
    assert term.options == {"model": "hf-hub:laion/CLIP-ViT-B-32", "scale": "1"} and term.weight is None
    first, second = parse_spec("clip:model=local-dir:/a/b=2 , jpeg:weight=0.5")
    assert first.options == {"model": "local-dir:/a/b=2"} and second.weight == 0.5


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ("hpsv2", ["xswu/HPSv2", "HPS_v2.1_compressed.pt", "checkpoint=/path"]),
        ("pickscore", ["yuvalkirstain/PickScore_v1", "model=/path"]),
        ("aesthetic", ["camenduru/improved-aesthetic-predictor", "head=/path"]),
        ("imagereward", ["THUDM/ImageReward", "checkpoint=/path"]),
        ("clip:model=openai/clip-vit-base-patch32", ["openai/clip-vit-base-patch32", "model=/path"]),
    ],
)
def test_offline_and_not_cached_names_the_id_and_asks_for_a_local_path(spec, fragments, monkeypatch, tmp_path):
    import huggingface_hub

    from diffalign.rewards import load_reward

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)  # an empty cache
    with pytest.raises(UserError) as error:
        load_reward(spec)
    message = str(error.value)
    assert "\n" not in message and "HF_HUB_OFFLINE" in message
    for fragment in fragments:
        assert fragment in message


def test_missing_local_paths_are_user_errors(tmp_path):
    from diffalign.rewards import load_reward

    with pytest.raises(UserError, match="does not exist"):
        load_reward(f"hpsv2:checkpoint={tmp_path}/nope.pt")
    with pytest.raises(UserError, match="has no sac\\+logos"):
        load_reward(f"aesthetic:head={tmp_path}")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="weights-only torch checkpoint"):
        load_reward(f"hpsv2:checkpoint={tmp_path / 'bad.pt'}")


def test_open_clip_name_without_weights_is_refused():
    from diffalign.rewards import load_reward

    with pytest.raises(UserError, match="needs weights: add pretrained="):
        load_reward("clip:model=ViT-B-32")


# ---------------------------------------------------------------------------------------------- preprocessing
def test_resize_crop_normalise_helpers():
    from diffalign.rewards.base import Preprocess, center_crop, normalize, resize, resized_shorter_side

    assert resized_shorter_side(480, 640, 224) == (224, 298)
    assert resized_shorter_side(640, 480, 224) == (298, 224)
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(2, 3, 5, 7)
    assert torch.equal(resize(x, (5, 7)), x), "same size is a no-op"
    assert torch.equal(center_crop(x, (3, 4)), x[..., 1:4, 2:6])  # torchvision rounds 1.5 to 2
    assert torch.equal(center_crop(x, (3, 4), rounding="floor"), x[..., 1:4, 1:5])
    mean, std = (1.0, 2.0, 3.0), (2.0, 4.0, 8.0)
    torch.testing.assert_close(normalize(x, mean, std)[:, 2], (x[:, 2] - 3) / 8)
    images = torch.rand(1, 3, 64, 96, requires_grad=True)
    out = Preprocess(resize=32, crop=(32, 32))(images)
    assert out.shape == (1, 3, 32, 32)
    (grad,) = torch.autograd.grad(out.sum(), images)
    assert grad.abs().sum() > 0


def test_antialiased_downsampling_matches_torchvision():
    import torchvision.transforms.v2.functional as tvF

    from diffalign.rewards.base import resize

    images = torch.rand(2, 3, 97, 131)
    expected = tvF.resize(images, [40, 54], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
    torch.testing.assert_close(resize(images, (40, 54)), expected)


def test_image_to_tensor_accepts_pil_numpy_and_tensors():
    from diffalign.rewards.base import image_to_tensor

    array = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    expected = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(image_to_tensor(Image.fromarray(array)), expected)
    torch.testing.assert_close(image_to_tensor(array), expected)
    torch.testing.assert_close(image_to_tensor(array.astype(np.float32) / 255), expected)
    rgba = np.concatenate([array, np.full((6, 5, 1), 7, np.uint8)], axis=-1)
    torch.testing.assert_close(image_to_tensor(rgba), expected)
    assert image_to_tensor(array[..., 0]).shape == (3, 6, 5)


@pytest.mark.parametrize("key", ["clip", "hpsv2", "aesthetic", "imagereward"])  # one per encoder code path
def test_bfloat16_rewards_score_close_to_float32(tiny, key):
    from diffalign.rewards import load_reward

    reward = load_reward(specs(tiny)[key], dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in reward.parameters())
    images = quantised_images()
    scores = reward(images, PROMPTS)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    expected = load(tiny, key)(images, PROMPTS)
    torch.testing.assert_close(scores, expected, atol=0.05 * expected.abs().max().item() + 0.05, rtol=0.05)


def test_rewards_never_import_diffusers():
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from diffalign.rewards import REWARDS, load_reward\n"
        "import diffalign.rewards.imagereward, diffalign.rewards.clip, diffalign.apps.score, diffalign.data.images\n"
        "load_reward('jpeg=1,toy-gold=1')(torch.rand(1, 3, 32, 32), ['a red circle on a white background'])\n"
        "assert 'diffusers' not in sys.modules, 'diffusers was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_method_that_backpropagates_refuses_a_non_differentiable_reward():
    from diffalign.errors import UserError
    from diffalign.rewards import parse_differentiable_spec

    assert [t.cls.name for t in parse_differentiable_spec("toy-clip=2,clip", "x")] == ["toy-clip", "clip"]
    for spec in ("jpeg", "toy-clip,toy-gold=0.5"):
        with pytest.raises(UserError, match=r"alignprop.reward: reward '(jpeg|toy-gold)' is not differentiable"):
            parse_differentiable_spec(spec, "alignprop.reward")
