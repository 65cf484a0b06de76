"""Save and load compressed models without pickles: a plan (JSON) plus weights (safetensors).

``save(model, folder, plan=plan)`` writes ``plan.json`` and ``model.safetensors``, each
atomically (temporary file, then rename). The stored plan holds the ranks the layers actually
have (a CUR layer's width, a clamped rank) and the weights file's SHA-256.
``load(base_model, folder)`` rebuilds the factorized structure on a copy of the original
architecture from the plan, then loads the weights strictly. It never unpickles anything, and a
missing, truncated or altered file is an error before any model is returned: the weights must
match the plan's SHA-256 (a plan without one was altered, since ``save`` always writes it; only
``verify=False`` loads such a hand-written plan), the weights file must lie inside the folder,
and every loaded weight must be finite.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_model
from torch import nn

from . import methods
from ._modes import as_path, check_module, model_device
from .atomic import atomic_path, written_folder_problem
from .layers import ConvGeometry, FactorizedLayer, LowRankLinear
from .models import WeightsMismatchError, check_state_dict, first_non_finite
from .plans import LayerPlan, Plan
from .surgery import structure

PLAN_FILE = "plan.json"
WEIGHTS_FILE = "model.safetensors"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def layer_plan_of(layer: FactorizedLayer, module_type: str) -> LayerPlan:
    """The LayerPlan that rebuilds ``layer`` (its realised ranks and form)."""
    method, ranks, form = methods.plan_of(layer)
    return LayerPlan(method, ranks, form, module_type=module_type)


def realized_plan(model: nn.Module, plan: Plan | None = None) -> Plan:
    """``plan`` with the ranks the factorized layers of ``model`` really have; a layer the plan
    does not mention is added. Refuses a plan whose layers ``model`` has not factorized."""
    stored = Plan(meta=dict(plan.meta) if plan is not None else {})
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FactorizedLayer)}
    nested = sorted(n for n in layers for outer in layers if n.startswith(f"{outer}."))
    if nested:  # load rebuilds from the dense model, whose layers hold no such sub-layer
        raise ValueError(f"layer {nested[0]!r} is factorized inside a factorized layer: a plan "
                         "cannot rebuild it; factorize the dense layer once, at the ranks wanted")
    for name, lp in (plan or {}).items():
        if lp.skip:  # as skipped, unless it was factorized since (by hand): then as it is
            stored[name] = lp if name not in layers else layer_plan_of(
                layers[name], _dense_type(layers[name]))
            continue
        if name not in layers:
            raise ValueError(f"plan layer {name!r} is not factorized in this model: pass the "
                             "model that rankcut.apply returned")
        actual = layer_plan_of(layers[name], lp.module_type or _dense_type(layers[name]))
        stored[name] = LayerPlan(actual.method, actual.ranks, actual.form, dict(lp.options),
                                 dict(lp.predicted), lp.reason, actual.module_type)
    for name, layer in layers.items():
        if name not in stored:
            stored[name] = layer_plan_of(layer, _dense_type(layer))
    return stored


def _conv_record(geometry: ConvGeometry) -> dict:
    """What of a convolution's geometry the layer's weights do not show (a model with the same
    names and shapes may stride or dilate otherwise), as JSON."""
    pad = geometry.padding if isinstance(geometry.padding, str) else list(geometry.padding)
    return {"stride": list(geometry.stride), "padding": pad,
            "dilation": list(geometry.dilation), "padding_mode": geometry.padding_mode}


def _check_geometry(base_model: nn.Module, plan: Plan, where: Path) -> None:
    """Refuse a ``base_model`` whose convolutions the save's factorized layers were not made
    from: the plan records each one's geometry (saves before it was recorded: not checked)."""
    records = plan.meta.get("conv_geometry") or {}
    if not isinstance(records, dict) or not all(isinstance(r, dict) for r in records.values()):
        raise ValueError(f"{where}: meta.conv_geometry must map layer names to their recorded "
                         f"geometry (as rankcut.save writes it), got {records!r}")
    for name, want in records.items():
        try:
            module = base_model.get_submodule(name)
        except AttributeError:
            continue  # (the plan check names a missing layer)
        if isinstance(module, nn.Conv2d):
            have = _conv_record(ConvGeometry.of(module))
            changed = {k: (want.get(k), v) for k, v in have.items() if want.get(k) != v}
            if changed:
                raise ValueError(f"{where}: layer {name!r} was saved from a convolution with "
                                 + ", ".join(f"{k} {then}" for k, (then, _) in changed.items())
                                 + "; the model's has "
                                 + ", ".join(f"{k} {now}" for k, (_, now) in changed.items())
                                 + " (a plan for another architecture?)")


def _dense_type(layer: FactorizedLayer) -> str:
    return "Linear" if isinstance(layer, LowRankLinear) else "Conv2d"


def save(model: nn.Module, path: str | os.PathLike, plan: Plan | None = None) -> Path:
    """Write ``plan.json`` and ``model.safetensors`` into the folder ``path``; returns it."""
    from . import __version__

    check_module(model)
    if plan is not None and not isinstance(plan, Plan):
        raise ValueError(f"plan: expected a rankcut.Plan or None, got {type(plan).__name__}")
    if hasattr(model, "rankcut_fuse"):  # its BatchNorms folded away: no plan rebuilds that
        raise ValueError("model: a fused model (rankcut.fuse) cannot be saved for rankcut.load; "
                         "save the model before fusing, and fuse after loading")
    folder = as_path(path)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder}: a file, not a folder (rankcut.save writes a folder "
                              f"holding {PLAN_FILE} and {WEIGHTS_FILE})")
    # (written into, not replaced: an existing folder is probed itself; unwritable, it was
    # safetensors' own error)
    problem = written_folder_problem(folder)
    if problem is not None:
        raise ValueError(f"path: {problem}")
    if isinstance(model, FactorizedLayer):  # load rebuilds inside a model: never the model
        raise ValueError(f"model: a bare {type(model).__name__}; rankcut.load rebuilds layers "
                         "inside a model and cannot replace the model itself: save "
                         "nn.Sequential(layer)")
    stored = realized_plan(model, plan)
    stored.meta["conv_geometry"] = {n: _conv_record(m.geometry) for n, m in model.named_modules()
                                    if isinstance(m, FactorizedLayer)
                                    and isinstance(getattr(m, "geometry", None), ConvGeometry)}
    stored.to_json()  # a plan that cannot be written stops the save before any file changes
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_model(model, str(tmp))
        stored.meta.update(weights_file=WEIGHTS_FILE, weights_sha256=_sha256(tmp),
                           rankcut_version=__version__, model_class=type(model).__name__)
        text = stored.to_json()
    _write_plan(text, folder / PLAN_FILE)
    return folder


def save_plan(plan: Plan, path: str | os.PathLike) -> Path:
    """Write ``plan`` as JSON to the file ``path`` (atomically; its folder made if missing)."""
    if not isinstance(plan, Plan):
        raise ValueError(f"plan: expected a rankcut.Plan, got {type(plan).__name__}")
    path = as_path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: a folder; save_plan writes a JSON file")
    return _write_plan(plan.to_json(), path)


def _write_plan(text: str, path: Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return path


def load_plan(path: str | os.PathLike) -> Plan:
    """The plan stored in a save folder, or in a plan file (``plan.json``)."""
    path = as_path(path)
    # a file is the plan itself; a missing *.json names the missing plan file; else a folder
    plan_file = path if path.is_file() or (path.suffix == ".json" and not path.is_dir()) \
        else path / PLAN_FILE
    if not plan_file.is_file():
        raise FileNotFoundError(f"{plan_file}: not found (expected a {PLAN_FILE} file or a "
                                f"rankcut save folder holding {PLAN_FILE} and {WEIGHTS_FILE})")
    try:
        return Plan.from_json(plan_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{plan_file}: {err} (expected a {PLAN_FILE} file written by rankcut, "
                         "or a rankcut save folder)") from None


def _weights_path(folder: Path, plan: Plan) -> Path:
    """The weights file the plan names, which must lie inside ``folder`` (no absolute path, no
    ``..``, no symbolic link leading out of it)."""
    name = plan.meta.get("weights_file", WEIGHTS_FILE)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{folder / PLAN_FILE}: weights_file must be a file name, got {name!r}")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise ValueError(f"{folder / PLAN_FILE}: weights_file {name!r} leaves the folder; it "
                         f"must name a file inside {folder} (e.g. {WEIGHTS_FILE!r})")
    weights = folder / relative
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: not found (saved beside {PLAN_FILE})")
    if not weights.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"{folder / PLAN_FILE}: weights_file {name!r} leads out of the folder "
                         f"(to {weights.resolve()}); it must be a file inside {folder}")
    return weights


def load(base_model: nn.Module, path: str | os.PathLike, *, verify: bool = True) -> nn.Module:
    """The compressed model saved in ``path``, rebuilt on a copy of ``base_model`` (the original,
    uncompressed architecture; its weights do not matter). ``base_model`` is not changed. The
    weights take ``base_model``'s dtype and device (a float16 save loads as float32 into a
    float32 model; ``base_model.to(torch.float64)`` first keeps a float64 save's precision).

    The weights file must match the SHA-256 the plan records. ``save`` always records it, so a
    plan without one was altered and is refused; ``verify=False`` skips the check (for a plan
    written by hand). A weights file outside the folder and non-finite weights (a tensor that
    is not already non-finite in ``base_model``, as a -inf mask buffer is) are refused
    either way (ValueError)."""
    check_module(base_model, "base_model")
    folder = as_path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: a file, not a folder (a rankcut save folder holds "
                         f"{PLAN_FILE} and {WEIGHTS_FILE})")
    plan = load_plan(folder)
    weights = _weights_path(folder, plan)
    if verify:
        expected = plan.meta.get("weights_sha256")
        if expected is None:
            raise ValueError(f"{folder / PLAN_FILE}: no weights_sha256: rankcut always records "
                             "the weights' hash, so this folder was altered; load it only if you "
                             "wrote the plan yourself (verify=False, or --no-verify)")
        if _sha256(weights) != expected:
            raise ValueError(f"{weights}: contents do not match {PLAN_FILE} (SHA-256 differs): "
                             "the file was changed or truncated after saving, or a save into "
                             "this folder was interrupted between its two files (save again)")
    _check_geometry(base_model, plan, folder / PLAN_FILE)
    try:
        model = structure(base_model, plan)
    except ValueError as err:  # a plan that does not fit base_model: name the file
        raise ValueError(f"{folder / PLAN_FILE}: {err}") from None
    device = model_device(model)
    try:
        load_model(model, str(weights), strict=True, device=str(device))
    except (SafetensorError, RuntimeError, OSError) as err:
        if isinstance(err, RuntimeError):
            # name the keys and shapes that differ (load_state_dict's own text spans lines)
            try:
                check_state_dict(model, load_file(str(weights)), "the weights")
            except WeightsMismatchError as mismatch:
                err = mismatch
        raise ValueError(f"{weights}: cannot load into the rebuilt model: {err}") from None
    # (a tensor already non-finite in base_model, e.g. a -inf attention mask buffer, is its own)
    own = {k for k, v in base_model.state_dict().items()
           if v.is_floating_point() and not bool(v.isfinite().all())}
    bad = first_non_finite({k: v for k, v in model.state_dict().items() if k not in own})
    if bad is not None:
        raise ValueError(f"{weights}: tensor {bad!r} holds NaN or infinite values; refusing a "
                         "model that cannot compute")
    return model
