"""The formats of a keras_hub backbone's weights folder, read with json alone (no framework).

keras_hub's ``from_preset`` reads three (its ``get_preset_loader`` tells them by config.json):
a preset as ``save_to_preset`` writes it (``keras``: config.json with ``class_name`` and
model.weights.h5), a Hugging Face snapshot (``transformers``: config.json with ``model_type`` and
model.safetensors, or shards listed in model.safetensors.index.json) and a timm folder (``timm``:
config.json with ``architecture`` and model.safetensors). A snapshot is accepted where keras_hub
converts its model type (or timm architecture) into the backbone's family; each refusal is one
paragraph naming the folder, what it holds and what would work.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Protocol

from transfer_ensemble.backbones.spec import BackboneSpec, Preprocessing, file_sha256
from transfer_ensemble.errors import UserError

KERAS, TRANSFORMERS, TIMM = "keras", "transformers", "timm"
SNAPSHOTS = (TRANSFORMERS, TIMM)
CONFIG, KERAS_WEIGHTS = "config.json", "model.weights.h5"
SAFETENSORS, SHARDS = "model.safetensors", "model.safetensors.index.json"
PREPROCESSOR = "preprocessor_config.json"
REQUIRED = {TRANSFORMERS: ("hidden_size", "patch_size", "num_hidden_layers"), TIMM: ("num_features",)}

# A Hugging Face config's names for what a keras_hub ViT config calls its dimensions.
HF_KEYS = {"hidden_dim": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
           "intermediate_dim": "intermediate_size", "patch_size": "patch_size",
           "num_register_tokens": "num_register_tokens", "use_gated_mlp": "use_gated_mlp"}


class Convertible(Protocol):
    """What a family says about the snapshots keras_hub converts into it (``hub.Family``)."""

    cls: str
    model_types: tuple[str, ...]
    vision_config: str
    timm_prefixes: tuple[str, ...]


def what_works(name: str, fetch: str) -> str:
    """The sentence listing the folders that would work for backbone `name`."""
    return (f"A folder {name}/ works as keras_hub's save_to_preset writes it ({fetch}), or as a Hugging Face "
            f"snapshot (config.json with model_type and model.safetensors) or a timm folder (config.json with "
            f"architecture and model.safetensors) of a model keras_hub converts.")


def contents(folder: Path) -> str:
    """The first names a folder holds, for an error message."""
    names = sorted(p.name for p in folder.iterdir())[:8] if folder.is_dir() else []
    return ", ".join(names) or "nothing"


def read_config(path: Path) -> dict:
    """A config.json as an object, or ValueError saying why not."""
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"it is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"it holds a JSON {type(config).__name__}, not an object")
    return config


def format_of(config: dict) -> str | None:
    """The format a config.json says, as keras_hub's get_preset_loader tells it."""
    if "registered_name" in config or "class_name" in config:
        return KERAS
    if "model_type" in config:
        return TRANSFORMERS
    if "architecture" in config:
        return TIMM
    return None


def check(spec: BackboneSpec, preset: Path, family: Convertible, fetch: str) -> tuple[str, tuple[Path, ...]]:
    """The format of the weights folder `preset` (which has a config.json) and the files its identity
    digests, config.json first; UserError where keras_hub could not read it."""
    path = preset / CONFIG
    try:
        config = read_config(path)
    except ValueError as exc:
        raise UserError(f"{path} is not a model config ({exc}). {what_works(spec.name, fetch)}") from None
    fmt = format_of(config)
    if fmt is None:
        raise UserError(f"{path} names no format keras_hub reads: it has no class_name (a keras_hub preset), "
                        f"model_type (a Hugging Face snapshot) or architecture (a timm folder). "
                        f"{what_works(spec.name, fetch)}")
    if fmt == KERAS:
        if not (preset / KERAS_WEIGHTS).is_file():
            raise UserError(f"The keras_hub preset {preset} lacks {KERAS_WEIGHTS} (the folder holds "
                            f"{contents(preset)}). Write it once on a machine with internet with {fetch} and copy "
                            f"it here.")
        return KERAS, (path, preset / KERAS_WEIGHTS)
    _check_convertible(spec, path, fmt, config, family, fetch)
    files = _weights_files(spec, preset, fmt, fetch)
    for file in files:
        _check_whole(file, fetch)
    if importlib.util.find_spec("safetensors") is None:
        raise UserError(f"Reading the {_described(fmt)} {preset} needs the safetensors package, which is not "
                        f"installed: pip install safetensors (the [hub] extra installs it), or save the preset "
                        f"once with {fetch} and pass that folder.")
    return fmt, (path, *files)


def _described(fmt: str) -> str:
    return "Hugging Face snapshot" if fmt == TRANSFORMERS else "timm folder"


def _check_convertible(spec: BackboneSpec, path: Path, fmt: str, config: dict, family: Convertible,
                       fetch: str) -> None:
    """Refuse a snapshot keras_hub does not convert into `family` (another model's, or none at all)."""
    if fmt == TRANSFORMERS:
        found, accepted, what = config["model_type"], family.model_types, "model_type"
        ok = found in accepted and (not family.vision_config or isinstance(config.get(family.vision_config), dict))
    else:
        found, accepted, what = config["architecture"], family.timm_prefixes, "architecture"
        ok = bool(accepted) and isinstance(found, str) and found.startswith(accepted)
    if ok:
        _check_complete(path, fmt, config, family, fetch)
        return
    if not accepted:
        raise UserError(f"{path} is a {_described(fmt)} ({what} {found!r}), and keras_hub converts no "
                        f"{_described(fmt)} into the {family.cls} that {spec.name} is. Save {spec.name} as a "
                        f"keras_hub preset instead: {fetch}.")
    wanted = " or ".join(repr(a) for a in accepted)
    raise UserError(f"{path} is the config of a {_described(fmt)} with {what} {found!r}, not one of {spec.name}, "
                    f"whose {what} is {wanted}{' with a vision_config' if family.vision_config else ''}: its "
                    f"features would be recorded under the wrong name. Put the snapshot of {spec.name} there, "
                    f"or save it with {fetch}.")


def _check_complete(path: Path, fmt: str, config: dict, family: Convertible, fetch: str) -> None:
    """Refuse a snapshot config that lacks what keras_hub's converter and ``keras_config`` read."""
    section = config[family.vision_config] if family.vision_config else config
    lacking = [key for key in REQUIRED[fmt] if key not in section]
    if lacking:
        where = f" in its {family.vision_config}" if family.vision_config else ""
        raise UserError(f"{path} has no {', '.join(lacking)}{where}, which keras_hub's converter reads: it is not a "
                        f"whole {_described(fmt)} config. Download the snapshot again, or save the preset once "
                        f"with {fetch}.")


def _weights_files(spec: BackboneSpec, preset: Path, fmt: str, fetch: str) -> tuple[Path, ...]:
    """model.safetensors, or the index of a sharded snapshot and its shards (each of which must be there)."""
    index = preset / SHARDS
    if index.is_file():
        try:
            shards = sorted(set(read_config(index)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{index} is not a safetensors index ({exc}): download the snapshot again, or save "
                            f"the preset once with {fetch}.") from None
        missing = [name for name in shards if not (preset / name).is_file()]
        if missing:
            raise UserError(f"The {_described(fmt)} {preset} lacks {', '.join(missing)}, listed in {SHARDS}: "
                            f"download the snapshot's every file again, or save the preset once with {fetch}.")
        return (index, *(preset / name for name in shards))
    if (preset / SAFETENSORS).is_file():
        return (preset / SAFETENSORS,)
    raise UserError(f"The {_described(fmt)} {preset} has no {SAFETENSORS} (it holds {contents(preset)}): keras_hub "
                    f"reads a snapshot's weights only from safetensors files. Download the snapshot with its "
                    f"{SAFETENSORS} (huggingface-cli download REPO --local-dir {preset} fetches every file), or "
                    f"save the preset once with {fetch}. {what_works(spec.name, fetch)}")


def _check_whole(path: Path, fetch: str) -> None:
    """Refuse a safetensors file shorter than its own header says (an interrupted download or copy)."""
    if path.suffix != ".safetensors":
        return
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little")
            if len(head) < 8 or length > size - 8:
                raise ValueError(f"its header claims {length} bytes of a {size}-byte file")
            header = json.loads(f.read(length))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not a readable safetensors file ({exc}): it is damaged. Download it again, "
                        f"or save the preset once with {fetch}.") from None
    needed = 8 + length + max(ends, default=0)
    if size < needed:
        raise UserError(f"{path} is cut short: it has {size} bytes where its header lists {needed}, e.g. after an "
                        f"interrupted download or copy. Download it again, or save the preset once with {fetch}.")


def identity(fmt: str, files: tuple[Path, ...]) -> str:
    """The identity of a snapshot: its format and a digest of its config and weights files."""
    digest = hashlib.sha256("".join(file_sha256(path) for path in files).encode()).hexdigest()
    return f"{fmt}:sha256:{digest}"


def keras_config(fmt: str, config: dict, family: Convertible) -> dict:
    """A snapshot's config.json in the names of a keras_hub config: a ViT's dimensions (the vision
    config of an image-text model), a timm net's pooled width (`num_features`)."""
    if fmt == TIMM:
        return {"num_features": config.get("num_features")}
    section = config.get(family.vision_config, {}) if family.vision_config else config
    out = {key: section[hf] for key, hf in HF_KEYS.items() if hf in section}
    if "intermediate_dim" not in out and isinstance(section.get("mlp_ratio"), (int, float)) \
            and isinstance(out.get("hidden_dim"), int):
        out["intermediate_dim"] = int(out["hidden_dim"] * section["mlp_ratio"])  # DINOv2 gives the ratio
    out.setdefault("num_register_tokens", 0)
    return out


def preprocessing(fmt: str, preset: Path, config: dict, default: Preprocessing) -> Preprocessing:
    """A snapshot's own normalisation where it states one (a Hugging Face preprocessor_config.json,
    a timm pretrained_cfg), else `default` (the family's published one)."""
    if fmt == TIMM:
        stated, path = config.get("pretrained_cfg") or {}, preset / CONFIG
        mean, std, rescale = stated.get("mean"), stated.get("std"), 1 / 255
    else:
        path = preset / PREPROCESSOR
        if not path.is_file():
            return default
        try:
            stated = read_config(path)
        except ValueError as exc:
            raise UserError(f"{path} is not a Hugging Face preprocessor config ({exc}). Delete it to use the "
                            f"published normalisation, or download the snapshot again.") from None
        mean, std, rescale = stated.get("image_mean"), stated.get("image_std"), stated.get("rescale_factor", 1 / 255)
    if mean is None and std is None:
        return default
    if not (_three(mean) and _three(std) and all(s > 0 for s in std) and isinstance(rescale, (int, float))):
        raise UserError(f"{path} gives the normalisation mean {mean!r} and std {std!r}, not 3 numbers each (std "
                        f"above 0). Correct or delete it to use the published normalisation.")
    return Preprocessing(rescale=float(rescale), mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))


def _three(values) -> bool:
    return isinstance(values, list) and len(values) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
