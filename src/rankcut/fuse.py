"""``rankcut.fuse``: a compressed (or dense) model made ready to deploy.

A compressed model still carries what training needed and inference does not: a BatchNorm after
most convolutions (four reads and writes of every activation for an affine map), and sometimes a
factorized layer that, after rank rounding or a later edit, saves neither parameters nor MACs.
:func:`fuse` returns a copy with

1. every BatchNorm2d folded into the convolution that feeds it, when that convolution's output
   goes to the BatchNorm alone: a dense ``nn.Conv2d`` absorbs it
   (:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`), a factorized convolution absorbs it into its
   last 1x1 (or 1 x kw) sub-convolution, which gains a bias; likewise every BatchNorm1d into
   the ``nn.Linear`` (or low-rank Linear's second factor) that feeds it
   (:func:`torch.nn.utils.fusion.fuse_linear_bn_eval`); the BatchNorm becomes
   ``nn.Identity``. Which convolution feeds which BatchNorm is read from the model's graph
   (:mod:`torch.fx`, factorized layers kept whole), and a pair is folded only where each module
   is called once, held at one path and its tensors not read elsewhere in the forward; a model
   that ``torch.fx`` cannot trace falls back to consecutive children of ``nn.Sequential``
   containers with Sequential's own forward, held once in the model, and seen in one forward
   on ``example_inputs`` each called once, the BatchNorm fed the layer's output (without
   ``example_inputs``, nothing is folded then). Never folded into: a subclass of Conv2d or
   Linear with its own forward (it may use the weight otherwise) or a layer whose weight is
   computed (weight or spectral norm, parametrized or by hooks); with ``example_inputs``, a
   BatchNorm1d fed a 3-D input (it normalises dim 1, not the features) is left alone;
2. with ``memory_format``, its weights put in that memory format (``"auto"``: whichever of
   channels_last and contiguous runs the model faster on ``example_inputs`` on this device);
3. every factorized layer that saves nothing turned back into its dense layer: with
   ``example_inputs``, one with at least the dense layer's parameters *and* MACs (at the input
   it really gets); without, one with at least its parameters; with ``revert_slower``, also one
   measured slower than its dense layer on this device (both timed in the memory format of
   step 2, or without one in the factorized layer's own);
4. with ``example_inputs`` and ``check=True``, its outputs compared with the original's.

The result is in eval mode (folding uses the running statistics) and records what was done in
``fused.rankcut_fuse``. :func:`rankcut.export` exports the fused model by default.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import numbers
import warnings

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ._modes import (
    batch_of,
    check_module,
    compare_outputs,
    eval_mode,
    forward_on,
    hooked,
    module_paths,
    on_model_device,
    output_tensors,
)
from .layers import FactorizedLayer, cost_at, input_shape, own_forward_reason
from .layers.conv import _ConvFactorized
from .layers.linear import LowRankLinear
from .profile import (
    MEMORY_FORMATS,
    beyond_channels_last,
    compare_latency,
    layer_input,
    suits_channels_last,
    unit_call_args,
)
from .surgery import set_submodule


def fuse(model: nn.Module, example_inputs=None, *, revert_slower: bool = False,
         latency_margin: float = 0.05, memory_format: str | None = None, check: bool = True,
         atol: float = 1e-4) -> nn.Module:
    """A deployable copy of ``model`` (see the module docstring); ``model`` is left as it was.

    Args:
        example_inputs: a tensor or tuple of tensors for one forward pass: the input sizes for
            the MACs of step 2, the timing of ``revert_slower`` and the check of step 4.
        revert_slower: also make dense again every factorized layer measured slower than its
            dense layer (after folding) by more than ``latency_margin`` (a fraction, for timing
            noise), each timed on a random input of the shape it gets from ``example_inputs``,
            on the model's device (interleaved runs, medians). Needs ``example_inputs``; the
            result then depends on the machine.
        memory_format: ``"channels_last"`` or ``"contiguous"``: the weights' memory format
            (feed inputs in the same format for the full speed); ``"auto"``: the faster of the
            two, timed on ``example_inputs`` (interleaved runs, medians); None: left as they are.
        check: compare the fused model's outputs with ``model``'s on ``example_inputs``
            (within ``atol * max(1, max |output|)``, ``atol`` at least 8 units in the last
            place of the output's dtype, as :func:`rankcut.export` checks); a RuntimeError if
            they differ.
    """
    check_module(model)
    if isinstance(atol, bool) or not isinstance(atol, numbers.Real) or not atol >= 0:
        raise ValueError(f"atol: expected a number >= 0, got {atol!r}")
    if not isinstance(revert_slower, bool):
        raise ValueError(f"revert_slower: expected True or False, got {revert_slower!r}")
    if (isinstance(latency_margin, bool) or not isinstance(latency_margin, numbers.Real)
            or not latency_margin >= 0):
        raise ValueError(f"latency_margin: expected a number >= 0, got {latency_margin!r}")
    if memory_format not in (None, "auto", *MEMORY_FORMATS):
        raise ValueError(f"memory_format: expected None, 'auto', "
                         f"{', '.join(map(repr, MEMORY_FORMATS))}, got {memory_format!r}")
    if (revert_slower or memory_format == "auto") and example_inputs is None:
        raise ValueError(f"{'revert_slower' if revert_slower else 'memory_format'}: needs "
                         "example_inputs (the model is timed on them)")
    inputs = None if example_inputs is None else on_model_device(model, example_inputs)
    fused = copy.deepcopy(model).eval()
    if inputs is not None:  # inputs the model cannot take: said as theirs, before any work
        with torch.no_grad(), forward_on(inputs):
            fused(*inputs)
    pairs = _layer_bn_pairs(fused, inputs)
    bn1d = {bn: fused.get_submodule(bn) for _, bn in pairs
            if isinstance(fused.get_submodule(bn), nn.BatchNorm1d)}
    if bn1d:
        # a BatchNorm1d normalises dim 1: of a 3-D input, not the features (without inputs
        # the input's rank is unknown, and nothing would check the fold: not folded)
        called = {}
        if inputs is not None:
            with torch.no_grad():
                called = unit_call_args(fused, inputs, bn1d)
        pairs = [(layer, bn) for layer, bn in pairs
                 if bn not in bn1d or (bn in called and called[bn][1][0].ndim == 2)]
    folded = [_fold(fused, conv, bn) for conv, bn in pairs]
    if memory_format == "channels_last" and beyond_channels_last(fused):
        raise ValueError("memory_format: 'channels_last' takes tensors of at most 4 "
                         "dimensions, and the model holds one of 5 or more (a Conv3d); pass "
                         "'contiguous', 'auto' or None")
    asked = memory_format
    if memory_format == "auto":  # (its channels_last forward tried there)
        memory_format = _faster_format(fused, inputs)
    if memory_format is not None:
        fused.to(memory_format=MEMORY_FORMATS[memory_format])
    if asked == "channels_last" and inputs is not None:
        try:  # (a .view of a channels_last activation: said as what it is, not a traceback)
            with torch.no_grad():
                fused(*inputs)
        except RuntimeError as err:
            raise ValueError(f"memory_format: the model's forward fails in channels_last "
                             f"({str(err).splitlines()[0]}); pass 'auto' or 'contiguous'"
                             ) from None
    reverted = _revert_unprofitable(fused, inputs, latency_margin if revert_slower else None,
                                    memory_format)
    fused.rankcut_fuse = {"folded": [f for f in folded if f], "reverted": reverted}
    if memory_format is not None:
        fused.rankcut_fuse["memory_format"] = memory_format
    fused.eval()  # the modules put in (identities, dense layers) too
    if check and inputs is not None:
        _check_outputs(model, fused, inputs, atol)
    return fused


# ------------------------------------------------------------------------------- which pairs

class _KeepFactorized(fx.Tracer):
    """Traces into user modules but keeps rankcut's factorized layers, torch.nn's, and subclasses
    of Conv2d and Linear that keep torch's forward whole."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, FactorizedLayer) or super().is_leaf_module(m, qualname)
                or (isinstance(m, nn.Conv2d | nn.Linear) and own_forward_reason(m) is None))


def _folds_into(m: nn.Module):
    """The BatchNorm class that folds into ``m`` (a conv: BatchNorm2d; a Linear: BatchNorm1d), or
    None. Only a Conv2d or Linear that computes with torch's own forward (a subclass with its
    own may compute otherwise: a standardised weight would undo the fold) and rankcut's
    factorized layers; never one whose weight is computed rather than held (weight or spectral
    norm, as a parametrization or by the older hooks): there is no tensor to fold into."""
    if any(isinstance(c, nn.Conv2d | nn.Linear)
           and not isinstance(c._parameters.get("weight"), nn.Parameter) for c in m.modules()):
        return None
    if isinstance(m, _ConvFactorized) or (isinstance(m, nn.Conv2d)
                                           and own_forward_reason(m) is None):
        return nn.BatchNorm2d
    if isinstance(m, LowRankLinear) or (isinstance(m, nn.Linear)
                                         and own_forward_reason(m) is None):
        return nn.BatchNorm1d
    return None


def _layer_bn_pairs(model: nn.Module, inputs) -> list[tuple[str, str]]:
    """(layer name, BatchNorm name) for every BatchNorm2d fed by a convolution, or BatchNorm1d fed
    by a Linear, whose output goes nowhere else, each module called once."""
    try:
        graph = _KeepFactorized().trace(model)
    except Exception as err:  # any tracing failure means: no graph
        what = (" nothing is folded without example_inputs (with them: a layer and the "
                "BatchNorm after it in an nn.Sequential, seen feeding it in one forward)"
                if inputs is None else " only a layer and the BatchNorm after it in an "
                "nn.Sequential, seen feeding it in one forward, are folded")
        warnings.warn(f"fuse: torch.fx cannot trace {type(model).__name__} ({err});{what}",
                      stacklevel=3)
        return [] if inputs is None else _sequential_pairs(model, inputs)
    calls: dict[str, int] = {}
    read: set[str] = set()  # modules whose tensors the forward also reads (conv.weight)
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr":
            parts = str(node.target).split(".")
            read.update(".".join(parts[:i]) for i in range(1, len(parts)))
    # fx names a module by its first path: one held at two runs under either (folded at one,
    # the other would still run the old module)
    paths = module_paths(model)

    def once(name: str) -> bool:
        return (calls[name] == 1 and name not in read
                and len(paths[id(model.get_submodule(name))]) == 1)

    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target),
                                                      nn.BatchNorm2d | nn.BatchNorm1d):
            continue
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                and _folds_into(model.get_submodule(src.target)) is type(
                    model.get_submodule(node.target))
                and once(src.target) and once(node.target)):
            pairs.append((src.target, node.target))
    return pairs


def _sequential_pairs(model: nn.Module, inputs) -> list[tuple[str, str]]:
    """Consecutive (layer, BatchNorm) children of the model's Sequentials (ones that run
    nn.Sequential's own forward), each module held once in the model (a module registered twice
    runs twice: folding into it would change both calls), and in one forward on ``inputs``
    each called once, the BatchNorm on the very tensor the layer returned, inside the
    Sequential's one call (a layer also called outside its Sequential, children of a Sequential
    called one by one from the model's forward, whose output it may read twice, or a
    Sequential the model enters otherwise, are not folded)."""
    paths = module_paths(model)
    pairs = []
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        # _modules, not named_children(): that skips a child seen before, which would make the
        # two modules around it look consecutive
        for (a, first), (b, second) in itertools.pairwise(seq._modules.items()):
            if (first is not None and second is not None and _folds_into(first) is type(second)
                    and len(paths[id(first)]) == 1 and len(paths[id(second)]) == 1):
                prefix = f"{name}." if name else ""
                pairs.append((prefix + a, prefix + b, name))
    if not pairs:
        return []
    calls: dict[str, list] = {}  # name: [times called, the layer's output / the BatchNorm's input]

    def record(name: str, is_bn: bool):
        def hook(_module, args, output) -> None:
            entry = calls.setdefault(name, [0, args[0] if is_bn else output])
            entry[0] += 1
        return hook

    # the Sequential itself called once too: its children called one by one from the model's
    # own forward (which may read the layer's output elsewhere) are not its forward's pair
    hooks = [(model.get_submodule(n), record(n, is_bn))
             for *pair, _ in pairs for n, is_bn in zip(pair, (False, True), strict=True)]
    hooks += [(model.get_submodule(seq), record(f"seq:{seq}", False))
              for seq in {seq for *_, seq in pairs}]
    with hooked(model, hooks), forward_on(inputs):
        model(*inputs)
    return [(a, b) for a, b, seq in pairs if a in calls and b in calls and calls[a][0] == 1
            and calls[b][0] == 1 and calls[b][1] is calls[a][1]
            and calls.get(f"seq:{seq}", [0])[0] == 1]


# ------------------------------------------------------------------------------ the folding

def _has_hooks(m: nn.Module) -> bool:
    """Whether forward hooks of the user's run on ``m`` (or on every module): folding would
    move what a hook on the layer sees, and drop a hook on the BatchNorm."""
    from torch.nn.modules import module as torch_module

    return bool(m._forward_hooks or m._forward_pre_hooks
                or torch_module._global_forward_hooks
                or torch_module._global_forward_pre_hooks)


def _fold(model: nn.Module, conv_name: str, bn_name: str) -> dict | None:
    conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
    if _has_hooks(conv) or _has_hooks(bn):
        return None  # (the pair stays as it is)
    if isinstance(conv, nn.Linear | LowRankLinear):
        out = conv.out_features
    else:
        out = conv.out_channels if isinstance(conv, nn.Conv2d) else conv.geometry.out_channels
    if bn.running_mean is None or bn.running_var is None or bn.num_features != out:
        return None  # batch statistics only, or not the layer's channels: nothing to fold
    if isinstance(conv, nn.Linear | LowRankLinear) and bn.weight is None:
        # affine=False: torch's Linear fold needs the scale and shift (its conv fold fills them)
        bn = copy.deepcopy(bn)
        bn.weight = nn.Parameter(torch.ones_like(bn.running_mean))
        bn.bias = nn.Parameter(torch.zeros_like(bn.running_mean))
    if isinstance(conv, nn.Linear):
        set_submodule(model, conv_name, fuse_linear_bn_eval(conv.eval(), bn.eval()))
    elif isinstance(conv, LowRankLinear):
        conv.second = fuse_linear_bn_eval(conv.second.eval(), bn.eval())
    elif isinstance(conv, nn.Conv2d):
        set_submodule(model, conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
    else:
        last = fuse_conv_bn_eval(conv._last().eval(), bn.eval())
        setattr(conv, conv.last_name, last)
        conv.geometry = dataclasses.replace(conv.geometry, bias=True)
    set_submodule(model, bn_name, nn.Identity())
    return {"conv": conv_name, "batchnorm": bn_name}


def _revert_unprofitable(model: nn.Module, inputs, margin: float | None,
                         memory_format: str | None) -> dict[str, str]:
    """Factorized layers that save nothing (with ``margin``: or run slower than dense by more
    than it, both timed in ``memory_format``, or None: the factorized layer's own), replaced by
    their dense layers (in that format); {name: why}."""
    # (a factorized layer that is the whole model has no parent to be replaced in: kept)
    dense = {n: m.to_dense() for n, m in model.named_modules()
             if isinstance(m, FactorizedLayer) and n}
    shapes = _input_shapes(model, inputs, dense) if inputs is not None else {}
    reverted = {}
    for name, plain in dense.items():
        layer = model.get_submodule(name)
        layout = memory_format or _format_of(layer)
        plain.to(memory_format=MEMORY_FORMATS[layout])
        why = _saves_nothing(layer, plain, shapes.get(name))
        if why is None and margin is not None and name in shapes:
            # timed as the planner's guard times a candidate: on a random input of the shape
            # it gets (the time does not depend on the values), in the layout deployed
            x = layer_input(plain, shapes[name], batch_of(inputs), memory_format=layout)
            d, f = compare_latency(plain, layer, x, warmup=3, repeats=15)
            if f.median_ms > (1 + margin) * d.median_ms:
                why = (f"{f.median_ms:.3f} ms > {d.median_ms:.3f} ms dense (batch "
                       f"{batch_of(inputs)}, {d.threads} threads, {d.device})")
        if why is not None:
            set_submodule(model, name, plain)
            reverted[name] = why
    return reverted


def _saves_nothing(layer: FactorizedLayer, dense: nn.Module, shape) -> str | None:
    """Why ``layer`` saves nothing over ``dense`` (params, and MACs at its input ``shape``
    where known), or None."""
    params = sum(p.numel() for p in layer.parameters())
    dense_params = sum(p.numel() for p in dense.parameters())
    if params < dense_params:
        return None
    why = f"{params:,} params >= {dense_params:,} dense"
    if shape is not None:
        macs, dense_macs = cost_at(dense, shape, layer.config()).macs, cost_at(dense, shape).macs
        if macs < dense_macs:
            return None
        why += f" and {macs:,} MACs >= {dense_macs:,} dense"
    return why


def _input_shapes(model: nn.Module, inputs, dense: dict[str, nn.Module]) -> dict[str, tuple]:
    """The input of each factorized layer named in ``dense`` (its first call), in the shape
    convention of :func:`rankcut.layers.cost_at` (as the planner records it)."""
    shapes: dict[str, tuple] = {}
    batch = batch_of(inputs)

    def record(name):
        def hook(module, args):  # a pre-hook returning None: the input is left alone
            shapes.setdefault(name, input_shape(dense[name], args[0], batch))
        return hook

    hooks = [(model.get_submodule(n), record(n)) for n in dense]
    with hooked(model, hooks, pre=True), forward_on(inputs):
        model(*inputs)
    return shapes


def _faster_format(model: nn.Module, inputs) -> str:
    """"channels_last" or "contiguous", whichever runs ``model`` faster on ``inputs``;
    "contiguous" where channels_last cannot hold its tensors (5-D ones) or its forward fails in
    it (a ``.view`` of a channels_last activation: with a warning, as training does)."""
    if not suits_channels_last(model):
        return "contiguous"
    plain, cl = (copy.deepcopy(model).to(memory_format=MEMORY_FORMATS[f])
                 for f in ("contiguous", "channels_last"))
    try:
        with torch.no_grad():
            cl(*inputs)
    except RuntimeError as err:
        warnings.warn(f"memory_format='auto': the forward fails in channels_last "
                      f"({str(err).splitlines()[0]}); contiguous", stacklevel=3)
        return "contiguous"
    # channels_last weights make the convolutions' outputs channels_last from the first on,
    # whatever the input's format: both are timed on the inputs as given
    plain_ms, cl_ms = compare_latency(plain, cl, inputs, warmup=3, repeats=15)
    return "channels_last" if cl_ms.median_ms < plain_ms.median_ms else "contiguous"


def _format_of(module: nn.Module) -> str:
    """The memory format of ``module``'s 4-D weights: "channels_last" where any is held so (and
    is not also contiguous: a 1x1 kernel of one channel is both), else "contiguous"."""
    return "channels_last" if any(
        p.ndim == 4 and not p.is_contiguous()
        and p.is_contiguous(memory_format=torch.channels_last)
        for p in module.parameters()) else "contiguous"


def _check_outputs(model: nn.Module, fused: nn.Module, inputs, atol: float) -> None:
    with eval_mode(model), torch.no_grad():
        expected = output_tensors(model(*inputs), "model output")
        actual = output_tensors(fused(*inputs), "fused model output")
    compare_outputs("the fused model", actual, expected, atol)
