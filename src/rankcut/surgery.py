"""Find the layers worth factorizing, and replace them by qualified name without touching the
caller's model.

``apply(model, plan)`` decomposes each planned layer and swaps in its factorized layer on a deep
copy (``inplace=True`` edits ``model`` itself). Every check (names exist, types fit the method,
solver options are ones the solver takes) runs before anything is changed, and a layer is
located and replaced by its qualified name, so nested and repeated blocks work (seed 002's code
attached new blocks beside the old convolutions; this cannot).
"""

from __future__ import annotations

import copy
import fnmatch
import math
import numbers
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ._modes import (
    check_module,
    leaves_parametrizations_as_they_were,
    model_device,
    model_dtype,
    module_paths,
)
from .calibrate import (
    check_reusable,
    corrected_weight,
    forward_order,
    input_second_moments,
    paired_moments,
)
from .defaults import COMPRESS
from .layers import conv_skip_reason, own_forward_reason
from .methods import DATA_AWARE
from .plans import LayerPlan, Plan

Pattern = str | type


def _matches(name: str, module: nn.Module, patterns: Iterable[Pattern]) -> Pattern | None:
    for pattern in patterns:
        if isinstance(pattern, type):
            if isinstance(module, pattern):
                return pattern
        elif name == pattern or fnmatch.fnmatchcase(name, pattern):
            return pattern
    return None


def _check_patterns(patterns, name) -> tuple[Pattern, ...]:
    if patterns is None:
        return ()
    if isinstance(patterns, str | type):
        patterns = (patterns,)
    patterns = tuple(patterns)
    for p in patterns:
        if not isinstance(p, str | type):
            raise ValueError(f"{name}: expected module names, glob patterns or module types, "
                             f"got {p!r}")
    return patterns


_BARE_LAYER = ("model: a bare {0}; rankcut replaces layers inside a model and cannot replace "
               "the model itself: pass nn.Sequential(layer)")


def _parent_reads_weight(model: nn.Module, name: str) -> str | None:
    """Why replacing ``name`` would break its parent, which uses the weight itself, or None."""
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else None
    if isinstance(parent, nn.MultiheadAttention):
        return ("output projection of nn.MultiheadAttention, which reads its weight directly "
                "instead of calling it")
    if isinstance(parent, nn.TransformerEncoderLayer) and name.rpartition(".")[2] in (
            "linear1", "linear2"):
        return ("feed-forward layer of nn.TransformerEncoderLayer, whose inference fast path "
                "reads its weight directly instead of calling it")
    return None


def _sharing(model: nn.Module) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """Where each module is held (``module_paths``: a module at several paths runs at each)
    and which modules hold each parameter (several: tied weights), by ``id``."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            if name not in owners.setdefault(id(p), []):
                owners[id(p)].append(name)
    return module_paths(model), owners


def _never_reason(model: nn.Module, name: str, module: nn.Module,
                  sharing: tuple[dict, dict] | None = None) -> str | None:
    """Why layer ``name`` can never be factorized, whatever ``include`` says (a conv with one
    input channel per group, a subclass with its own forward, a parent that reads its weight,
    a module held at several paths, parameters shared with another module), or None: what
    target_layers skips and a plan is refused for alike. ``sharing``: :func:`_sharing` of the
    model, when the caller asks about many layers."""
    reason = (conv_skip_reason(module) if isinstance(module, nn.Conv2d)
              else own_forward_reason(module)) or _parent_reads_weight(model, name)
    if reason is not None:
        return reason
    paths, owners = sharing or _sharing(model)
    if len(paths[id(module)]) > 1:
        return (f"the same module is also at {', '.join(p for p in paths[id(module)] if p != name)}"
                ": replacing it at one path would leave the others dense")
    tied = sorted({o for p in module.parameters(recurse=False) for o in owners[id(p)]}
                  - set(paths[id(module)]))
    if tied:
        return (f"its parameters are shared with {', '.join(tied)} (tied weights): "
                "factorized, the other would keep them")
    return None


def weight_shape(module: nn.Conv2d | nn.Linear) -> list[int]:
    """The shape of the weight ``module`` computes with, from its settings: a parametrized
    weight is not among its own parameters, and computing it would step a training-mode
    spectral norm's power iteration. (A plan records it per layer, so that a plan applied to
    another model's layer of the same name is refused.)"""
    if isinstance(module, nn.Conv2d):
        return [module.out_channels, module.in_channels // module.groups,
                *module.kernel_size]
    return [module.out_features, module.in_features]


def _weight_size(module: nn.Conv2d | nn.Linear) -> int:
    """The entries of :func:`weight_shape`."""
    return math.prod(weight_shape(module))


def _layer_size(module: nn.Conv2d | nn.Linear) -> int:
    """:func:`_weight_size` and the bias (parametrized or not)."""
    plist = getattr(module, "parametrizations", None)
    bias = (plist is not None and "bias" in plist) or module._parameters.get("bias") is not None
    out = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
    return _weight_size(module) + out * bias


def target_layers(model: nn.Module, include=None, exclude=None, *,
                  min_params: int = COMPRESS["min_params"]) -> dict[str, str | None]:
    """Every Conv2d and Linear of ``model``: qualified name -> None (eligible) or why not.

    ``include``/``exclude``: qualified names, glob patterns (``"layer3.*"``) or module types
    (``nn.Linear``). Never eligible: a depthwise or single-input-channel convolution, a
    subclass with its own forward, a layer whose parent reads its weight directly, one held at
    several paths or sharing its parameters. By default a layer is also skipped when
    factorizing it cannot pay off: an input stem with at most 3 input channels, or fewer than
    ``min_params`` parameters; naming a layer exactly in ``include`` overrides these two.
    """
    check_module(model)
    if (isinstance(min_params, bool) or not isinstance(min_params, numbers.Real)
            or not math.isfinite(min_params) or min_params < 0):
        raise ValueError(f"min_params: expected a number >= 0, got {min_params!r}")
    include = _check_patterns(include, "include")
    exclude = _check_patterns(exclude, "exclude")
    if isinstance(model, nn.Conv2d | nn.Linear):
        raise ValueError(_BARE_LAYER.format(type(model).__name__))
    out: dict[str, str | None] = {}
    sharing = _sharing(model)
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d | nn.Linear):
            continue
        if (hit := _matches(name, module, exclude)) is not None:
            out[name] = f"excluded by {getattr(hit, '__name__', hit)!s}"
            continue
        if include and _matches(name, module, include) is None:
            out[name] = "not matched by include"
            continue
        forced = name in include
        reason = _never_reason(model, name, module, sharing)
        params = _layer_size(module)  # (a parametrized layer's computed weight too)
        if reason is None and not forced:
            if isinstance(module, nn.Conv2d) and module.in_channels <= 3:
                reason = f"input stem ({module.in_channels} input channels): too thin to pay off"
            elif params < min_params:
                reason = f"too small ({params} parameters < min_params={min_params})"
        out[name] = reason
    for label, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns:
            if not any(_matches(n, model.get_submodule(n), (pattern,)) for n in out):
                example = next(iter(out), "")
                raise ValueError(f"{label}: {getattr(pattern, '__name__', pattern)!r} matches no "
                                 f"Conv2d or Linear layer of the model (names look like "
                                 f"{example!r})")
    return out


def factorize(module: nn.Module, lp: LayerPlan, cov=None, entries=None,
              name: str | None = None) -> nn.Module:
    """The factorized layer ``lp`` describes, computed from ``module``'s weight (data-aware
    when ``cov``, the layer's input second moments, is given; ``entries``: the weight whose
    rows and columns CUR keeps, see ``Method.from_dense``). A layer built with more parameters
    than the plan priced (a sampled CUR's width varies with what it is fitted to) is warned
    about: the plan's predicted totals then miss by the difference."""
    new = lp.spec.from_dense(module, lp.ranks, lp.form, cov, lp.options, entries=entries)
    priced = lp.predicted.get("params")
    built = sum(p.numel() for p in new.parameters())
    if isinstance(priced, int) and built > priced:
        warnings.warn(f"layer {name!r}: built with {built:,} parameters where the plan priced "
                      f"{priced:,} (ranks {list(new.built_ranks())} for {list(lp.ranks)} "
                      "asked: a sampled CUR keeps a random number of columns and rows, which "
                      "varies with the weight and data it is fitted to); the plan's predicted "
                      "totals are short by the difference", stacklevel=3)
    return new


def check_weights(name: str, module: nn.Module) -> None:
    """Refuse a layer whose weight holds NaN or infinite values, naming it."""
    weight = getattr(module, "weight", None)
    if weight is not None and not bool(weight.detach().isfinite().all()):
        bad = int((~weight.detach().isfinite()).sum())
        raise ValueError(f"layer {name!r}: its weight has {bad} non-finite value(s) (NaN or "
                         "inf); fix the weights or exclude the layer")


def _check_plan(model: nn.Module, plan: Plan, weights: bool = True) -> None:
    """Reject a plan that does not fit ``model``, naming the layer, before anything changes
    (with ``weights``, also a planned layer whose weights are not finite)."""
    if not isinstance(plan, Plan):
        raise ValueError(f"plan: expected a rankcut.Plan, got {type(plan).__name__}")
    check_module(model)
    sharing = _sharing(model)
    for name, lp in plan.active.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"plan layer {name!r}: the model has no such module") from None
        # (a subclass of the planned type fits: a plan saved without one says "Conv2d")
        if lp.module_type and lp.module_type not in {c.__name__ for c in type(module).__mro__}:
            raise ValueError(f"plan layer {name!r}: planned for a {lp.module_type}, the model "
                             f"has a {type(module).__name__}")
        planned = lp.predicted.get("weight_shape")
        if (planned is not None and isinstance(module, nn.Conv2d | nn.Linear)
                and list(planned) != weight_shape(module)):
            raise ValueError(f"plan layer {name!r}: planned for a weight of shape "
                             f"{list(planned)}, the model's is {weight_shape(module)} (a plan "
                             "made for another model?)")
        if reason := _never_reason(model, name, module, sharing):
            raise ValueError(f"plan layer {name!r}: cannot factorize: {reason}")
        if (reason := lp.spec.why_not(module)) is not None:
            raise ValueError(f"plan layer {name!r}: {reason}")
        if any(r > _weight_size(module) for r in lp.ranks):  # a hand-edited plan's
            raise ValueError(f"plan layer {name!r}: ranks {list(lp.ranks)} above the layer's "
                             f"{_weight_size(module):,} weights: no factorization has them")
        if weights:
            check_weights(name, module)
        try:
            lp.layer_config(module)
            lp.spec.check_options(lp.options)
        except ValueError as err:
            raise ValueError(f"plan layer {name!r}: {err}") from None


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the qualified name ``name`` points in ``model``."""
    if not name:  # setattr(model, "", new) would add a child that forward never calls
        raise ValueError(_BARE_LAYER.format(type(model).__name__))
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def _replace(model: nn.Module, plan: Plan, make: Callable, inplace: bool,
             progress: bool = False, weights: bool = True) -> nn.Module:
    _check_plan(model, plan, weights)
    target = model if inplace else copy.deepcopy(model)
    items = list(plan.active.items())
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="factorizing", unit="layer")
    for name, lp in items:
        try:
            new = make(target.get_submodule(name), lp, name=name)
        except ValueError as err:
            raise ValueError(f"plan layer {name!r}: {err}") from None
        set_submodule(target, name, new)
    return target


@leaves_parametrizations_as_they_were
def apply(model: nn.Module, plan: Plan, *, inplace: bool = False, progress: bool = False,
          calib_data=None, max_batches: int | None = None, sequential: bool | None = None,
          reference: nn.Module | None = None) -> nn.Module:
    """A copy of ``model`` with every planned layer replaced by its factorized layer.

    ``model`` is left untouched unless ``inplace=True``. ``progress=True`` shows a progress bar.
    Layers whose options say ``"data_aware": true`` are factorized to minimise their output
    error on ``calib_data`` (batches of inputs, or (inputs, targets); at most ``max_batches``).

    ``sequential`` (default: on when ``calib_data`` is given): the layers are factorized one at a
    time in the order they run, each fitted to the inputs x̃ that the layers before it, already
    factorized, give it, with the ``reference`` model's outputs W x as its target (default: the
    model as given): first the weight W' = W E[x x̃ᵀ] E[x̃ x̃ᵀ]⁻¹ that best maps x̃ to W x, then its
    factorization (data-aware on x̃'s statistics), so errors do not compound through the
    network (:func:`rankcut.calibrate.paired_moments`). CUR, whose factors are the weight's own
    rows and columns, fits W' with W's rows and columns (W' has others); a CUR layer that is not
    data-aware is W's CUR, untouched by the data. Off, every layer is fitted to the dense model's
    own inputs (statistics collected once).
    """
    if not isinstance(plan, Plan):
        raise ValueError(f"plan: expected a rankcut.Plan, got {type(plan).__name__}")
    if sequential is None:
        sequential = calib_data is not None
    if not isinstance(sequential, bool):
        raise ValueError(f"sequential: expected True, False or None, got {sequential!r}")
    if sequential and calib_data is None:
        raise ValueError("sequential: needs calib_data (the inputs each layer is fitted to)")
    if sequential:
        check_reusable(calib_data)  # (one pass per layer)
    if reference is not None and not sequential:
        raise ValueError("reference: only sequential fitting uses a reference model")
    aware = [n for n, lp in plan.active.items() if lp.options.get(DATA_AWARE)]
    if aware and calib_data is None:
        raise ValueError(f"calib_data: the plan asks for data-aware factorization of {aware} "
                         "but no calibration data was given")
    if sequential:
        return _apply_sequential(model, plan, inplace, progress, calib_data, max_batches,
                                 reference)
    covs = {}
    if aware:
        _check_plan(model, plan)
        covs = input_second_moments(model, aware, calib_data, max_batches=max_batches)
    return _replace(model, plan, lambda module, lp, name=None: factorize(
        module, lp, covs.get(name), name=name), inplace, progress)


def _apply_sequential(model, plan, inplace, progress, calib_data, max_batches, reference):
    """:func:`apply` with ``sequential``: layer by layer in the order they run."""
    _check_plan(model, plan)
    if reference is None:
        reference = copy.deepcopy(model) if inplace else model
    else:
        check_module(reference, "reference")
        _check_plan(reference, plan)  # the model itself (or its copy) was checked just above
        for name in plan.active:  # its layers are fitted in the model's place: the same kind
            mine, theirs = model.get_submodule(name), reference.get_submodule(name)
            if (type(mine), mine.extra_repr()) != (type(theirs), theirs.extra_repr()):
                raise ValueError(f"reference: its layer {name!r} ({theirs}) is not the "
                                 f"model's ({mine}); reference must be the dense original of "
                                 "the model")
        # both run on the same inputs, batch by batch: one device and dtype
        where = [(model_device(m), model_dtype(m)) for m in (reference, model)]
        if where[0] != where[1]:
            raise ValueError(f"reference: it is on {where[0][0]} in {where[0][1]}, the model on "
                             f"{where[1][0]} in {where[1][1]}; move one to the other "
                             "(reference.to(...))")
    target = model if inplace else copy.deepcopy(model)
    order = forward_order(target, list(plan.active), calib_data)
    if progress:
        from tqdm.auto import tqdm

        order = tqdm(order, desc="factorizing (sequential)", unit="layer")
    standing_in: dict[str, nn.Module] = {}  # name -> the factorized layer a stand-in holds for
    try:
        for name in order:
            new = _fit_in_sequence(reference, target, name, plan.layers[name], calib_data,
                                   max_batches)
            stand_in = _calibration_stand_in(new)
            if stand_in is not None:
                standing_in[name] = new
            set_submodule(target, name, new if stand_in is None else stand_in)
    finally:  # (also when a fit fails: the model holds the factorized layers made so far)
        for name, new in standing_in.items():
            set_submodule(target, name, new)
    return target


# A CP layer's depthwise stages run far below the dense conv's speed per multiply-add on CPUs:
# at a quarter of the dense parameters or more it runs slower than the conv it replaces
# (1.1-1.6x at a quarter, 1.8-3.6x at a half, 4-10x at the full rank of seed 000's rule, on
# ResNet-56's 16/32/64-channel convs at batch 128, 2-core CPU, 2026-12-03).
STAND_IN_CP_FRACTION = 0.25


def _calibration_stand_in(layer: nn.Module) -> nn.Module | None:
    """The dense equivalent of a factorized ``layer`` (its composed weight: the same function,
    to rounding) for the calibration passes of the layers after it, where it runs faster than
    ``layer``; None where ``layer`` itself is as fast. The later layers' passes run through it
    once per layer, so a slow factorized layer early in a deep network is run hundreds of
    times; the model returned holds ``layer`` itself."""
    from .layers.conv import CPConv2d

    if not isinstance(layer, CPConv2d):
        return None
    dense = layer.geometry
    dense_params = dense.out_channels * dense.in_per_group * math.prod(dense.kernel_size)
    own = sum(p.numel() for n, p in layer.named_parameters() if not n.endswith("bias"))
    if own < STAND_IN_CP_FRACTION * dense_params:
        return None
    with torch.no_grad():
        return layer.to_dense()


def _fit_in_sequence(reference, target, name, lp, calib_data, max_batches):
    """Layer ``name`` of ``plan`` factorized, fitted to the inputs it gets in ``target`` (the
    layers before it already factorized) with ``reference``'s outputs as the target."""
    aware = bool(lp.options.get(DATA_AWARE))
    fitted = copy.deepcopy(reference.get_submodule(name))
    entries = None
    if aware or not lp.spec.keeps_entries:  # (a plain CUR is W's own: no data needed)
        moments, cross, count = paired_moments(reference, target, name, calib_data,
                                               max_batches=max_batches)
        if lp.spec.keeps_entries:  # CUR: W' fitted with W's own rows and columns
            entries = fitted.weight.detach().clone()
        with torch.no_grad():
            fitted.weight.copy_(corrected_weight(fitted, moments, cross, count))
        del cross  # consumed (it holds the Cholesky factor now): GBs for a wide layer
    try:
        return factorize(fitted, lp, moments if aware else None, entries=entries,
                         name=name)
    except ValueError as err:
        raise ValueError(f"plan layer {name!r}: {err}") from None


def structure(model: nn.Module, plan: Plan, *, inplace: bool = False) -> nn.Module:
    """Like :func:`apply` but without decomposing: each planned layer gets the factorized
    layer's shapes with fresh weights (``rankcut.load`` then loads the saved weights)."""
    # the base's weights are replaced by the saved ones: uninitialised memory (a model built
    # with skip_init or to_empty) is not refused
    return _replace(model, plan, lambda module, lp, name=None: lp.spec.structure(
        module, lp.ranks, lp.form), inplace, weights=False)
