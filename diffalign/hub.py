"""Resolving model names to local folders or hub ids, without importing torch (so bad input fails in well under 2 s)."""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from diffalign.errors import UserError

TINY_PREFIX = "tiny-"


def shipped_dir(name: str) -> Path:
    """A folder that ships beside the package ("assets", "configs"): in a source checkout (or editable install) the
    repository's own; in a wheel install the copy under `<prefix>/share/diffalign/` (pyproject data-files)."""
    package = Path(__file__).resolve().parent
    prefixes = [*package.parents[3:4], Path(sys.prefix)]  # <prefix>/lib/pythonX.Y/site-packages/diffalign
    candidates = [package.parent / name, *(prefix / "share" / "diffalign" / name for prefix in prefixes)]
    return next((c for c in candidates if c.is_dir()), candidates[0])


ASSETS_DIR = Path(os.environ.get("DIFFALIGN_ASSETS") or shipped_dir("assets"))
TOY_MODELS = {"toy": ASSETS_DIR / "toy" / "model", "toy-flow": ASSETS_DIR / "toy-flow" / "model"}
"""The bundled shapes-world pipelines: 'toy' (StableDiffusionPipeline, UNet + DDIM) and 'toy-flow'
(StableDiffusion3Pipeline, MMDiT + SD3.5's flow matching), built by scripts/make_toy_assets.py and
scripts/make_toy_flow_assets.py."""
TOY_MODEL_DIR = TOY_MODELS["toy"]
CONFIGS_DIR = shipped_dir("configs")


def offline() -> bool:
    """True when huggingface_hub must not touch the network (HF_HUB_OFFLINE=1)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=1)
def hub_unreachable() -> str | None:
    """Why nothing can be downloaded now ("HF_HUB_OFFLINE=1", or the hub endpoint does not answer a 3-second
    connection attempt), or None. Asked once per process, only when something is not in the cache: without it a
    missing model cost 14-20 s of retries and a missing dataset 30 s of `Retrying in 8s` lines."""
    if offline():
        return "HF_HUB_OFFLINE=1"
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError:
        declare_offline()
        return f"{host} cannot be reached"
    return None


def declare_offline() -> None:
    """Make this process offline for huggingface_hub, transformers and datasets (env and their loaded constants), so
    a later load reads the cache or fails at once instead of retrying the unreachable hub."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    for module, attribute in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE")):
        if module in sys.modules:
            setattr(sys.modules[module], attribute, True)


def resolve_model(name: str, revision: str | None = None) -> str:
    """Map a model name to what `from_pretrained` should load: a local folder (str path) or a hub id.

    'toy' and 'toy-flow' are the bundled shapes-world pipelines (`TOY_MODELS`); 'tiny-sd', 'tiny-sdxl', 'tiny-sd3',
    'tiny-flux' are built in memory from configs (random weights, for smoke tests) and returned unchanged. A hub id
    that is not in the local cache while offline is a UserError naming it.
    """
    if name in TOY_MODELS:
        folder = TOY_MODELS[name]
        if not (folder / "model_index.json").is_file():
            raise UserError(f"the {name} assets are not built yet ({folder} is missing): run `make assets`")
        return str(folder)
    if name.startswith(TINY_PREFIX):
        return name
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise UserError(
                f"{path} is not a diffusers pipeline folder (no model_index.json): save it with "
                "`pipe.save_pretrained(folder)`"
            )
        return str(path)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise UserError(f"model {name!r} is neither a local folder nor a hub id of the form owner/name")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "model_index.json", revision=revision)
    if isinstance(cached, str):
        return name
    reason = hub_unreachable()
    if reason:
        raise UserError(
            f"model {name!r} is not in the Hugging Face cache and {reason}: download it where there is network, "
            "or pass a local folder written by save_pretrained"
        )
    return name


def check_toy(name: str) -> str:
    """`name` if it is a bundled toy whose assets are built (its folder, resolved), else a one-line UserError."""
    if name not in TOY_MODELS:
        raise UserError(f"{name!r} is not a bundled toy model; choose {' or '.join(TOY_MODELS)}")
    return resolve_model(name)


def pipeline_class_name(resolved: str) -> str | None:
    """The `_class_name` of a local pipeline folder's model_index.json (None for hub ids and tiny models)."""
    index = Path(resolved) / "model_index.json"
    if not index.is_file():
        return None
    return json.loads(index.read_text()).get("_class_name")


@contextlib.contextmanager
def quiet_hf_logs(*libraries: str) -> Iterator[None]:
    """Silence the load reports, warnings and progress bars of `libraries` ("transformers", "diffusers") for the
    duration of the block (restored afterwards): for loads whose messages say nothing the user can act on."""
    saved = []
    for name in libraries:
        logging = importlib.import_module(f"{name}.utils.logging")
        saved.append((logging, logging.get_verbosity(), logging.is_progress_bar_enabled()))
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    try:
        yield
    finally:
        for logging, verbosity, bars in saved:
            logging.set_verbosity(verbosity)
            if bars:
                logging.enable_progress_bar()


def check_lora_folder(folder: str | Path) -> Path:
    """`folder` if it holds LoRA weights (.safetensors or .bin), else a one-line UserError (no torch needed)."""
    path = Path(folder).expanduser()
    if not path.is_dir() or not [*path.glob("*.safetensors"), *path.glob("*.bin")]:
        problem = "has no .safetensors/.bin weights" if path.is_dir() else "is not a folder"
        raise UserError(f"LoRA {folder} {problem}: give a folder written by save_lora or save_lora_weights")
    return path


def check_denoiser_folder(folder: str | Path) -> Path:
    """`folder` if it looks like a denoiser saved with `save_pretrained` (config.json + weights), else a one-line
    UserError naming it."""
    path = Path(folder).expanduser()
    weights = [*path.glob("*.safetensors"), *path.glob("*.bin")] if path.is_dir() else []
    if not (path / "config.json").is_file() or not weights:
        what = "is not a folder" if not path.is_dir() else "has no config.json and weights"
        raise UserError(f"denoiser {folder} {what}: give a folder written by unet/transformer.save_pretrained")
    return path
