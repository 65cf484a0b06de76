"""The factorization methods rankcut knows, each declared once.

A :class:`Method` says everything rankcut needs about one way of factorizing a layer: its name
and forms, the factorized layer class it builds for a Linear and for a Conv2d, which layers it
applies to, the :mod:`rankcut.decompose` function its solver options go to, whether it has a
data-aware solver, whether ``method="auto"`` considers it, and how its error/cost curve is made
(:mod:`rankcut.curves`). Plans (:mod:`rankcut.plans`), ``apply``/``structure``
(:mod:`rankcut.surgery`), ``save``/``load`` (:mod:`rankcut.io`), the planner, the reports and
the command line all read this table; none keeps its own list of methods.

==============  ========================  =================  =====  ==========  ====
method          Linear / 1x1 Conv2d       k x k Conv2d       forms  data-aware  auto
==============  ========================  =================  =====  ==========  ====
``svd``         LowRankLinear/SVDConv2d   SVDConv2d          -      yes         yes
``cur``         LowRankLinear/SVDConv2d   SVDConv2d          -      yes         no
``spatial_svd`` -                         SpatialConv2d      -      no          yes
``cp``          -                         CPConv2d           cp4,   yes         yes
                                                             cp3
``tucker``      -                         TuckerConv2d       -      yes         yes
==============  ========================  =================  =====  ==========  ====

A form is also a name: ``"cp3"`` means ``cp`` with form ``cp3`` (:func:`resolve`). CUR is not an
``auto`` candidate: at equal width its error is never below the truncated SVD's (Eckart-Young),
so ``auto`` would never choose it and scoring it would only cost time; ask for it by name when
you want a layer made of actual rows and columns of the weight.

Adding a method (say ``"tt"``): (1) the decomposition in ``rankcut/decompose/``; (2) the layer
class in ``rankcut/layers/`` with ``from_dense(dense, ranks, *, cov=None, **options)``,
``like``, ``config`` and ``dense_weight``, its cost in ``layers/costs.py``; (3) its curve in
``rankcut/curves.py``; (4) one ``register(Method(...))`` below. Plans, apply, save/load, the
planner, reports and the CLI then know it; ``tests/test_methods.py`` checks every registered
method end to end.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from torch import nn

from . import curves
from . import decompose as dec
from .layers import (
    CPConv2d,
    FactorizedLayer,
    LowRankLinear,
    SpatialConv2d,
    SVDConv2d,
    TuckerConv2d,
    conv_skip_reason,
    cost_at,
    cp_break_even,
    own_forward_reason,
    rebuild,
)
from .layers.base import ConvGeometry, solver_kwargs
from .layers.costs import Cost

# The option key that is rankcut's own (fit in the output norm), not the solver's.
DATA_AWARE = curves.DATA_AWARE


# The solvers' numeric options (rankcut.decompose): (type, lower bound, bound excluded),
# checked with the others before any work (the solvers check them again when they run); a
# method's ``zero_ok`` names those its solver also takes at 0
NUMBER_OPTIONS = MappingProxyType({
    "max_iter": (int, 1, False), "n_iter": (int, 0, False), "oversample": (int, 0, False),
    "n_cols": (int, 1, False), "n_rows": (int, 1, False), "tol": (float, 0, False),
    "ridge": (float, 0, True), "max_work": (float, 0, True)})

# The solvers' arguments that the layers pass themselves (the data's moments, the kept entries,
# the modes a Tucker-2 factorizes), never a user's option
SET_BY_LAYERS = frozenset({"cov", "entries", "modes"})


@dataclass(frozen=True)
class Method:
    """One factorization method. See the module docstring for the table of methods."""

    name: str
    summary: str
    conv: type[FactorizedLayer] | None  # the layer it builds for an nn.Conv2d
    linear: type[FactorizedLayer] | None  # ... for an nn.Linear
    solver: Callable  # the rankcut.decompose function that the layer's options go to
    curve_fn: Callable  # (method, module, shape, form, options, kind) -> [Candidate]
    at_fn: Callable  # (method, module, shape, ranks, form, options) -> Candidate
    # (method, module, shape, form) -> the candidates worth scoring, priced, error NaN: set for
    # methods whose errors must be measured (CP, CUR); the planner measures them for all layers
    # at once (curves.measured), so their solves batch, data-aware only with calibration data
    grid_fn: Callable | None = None
    n_ranks: int = 1  # how many ranks a plan gives (Tucker-2: (R_out, R_in))
    # whose singular values its ranks cut, one per rank (rankcut.layers.group_matrices shapes):
    # what the energy and VBMF rank rules read, and the truncation that a method without a
    # grid_fn gives its closed-form error by. () for CP: no singular values, those rules refused
    spectra: tuple[str, ...] = ("channel",)
    forms: tuple[str, ...] = ()  # the first is the default
    kxk_only: bool = False  # needs a spatial kernel larger than 1x1
    data_aware: bool = False  # has a solver that fits the output norm on calibration data
    # its factors are entries of the weight itself (CUR's actual rows and columns): sequential
    # fitting (rc.apply) fits the corrected weight W' with the dense weight's own rows and
    # columns (``from_dense(entries=W)``): W' itself has other rows and columns
    keeps_entries: bool = False
    auto: bool = False  # a candidate of method="auto"
    layer_options: Mapping = field(default_factory=dict)  # fixed layer settings
    planning_options: Mapping = field(default_factory=dict)  # solver options plans default to
    # solver options for scoring candidates: enough to rank them (the planned layer gets the
    # plan's own run); the user's options override them
    scoring_options: Mapping = field(default_factory=dict)
    # the values a solver option may take (option -> choices), checked before any work
    choices: Mapping = field(default_factory=dict)
    # NUMBER_OPTIONS its solver takes at 0 too (CP-ALS without a ridge; SVD, CUR and Tucker-2
    # need one to invert the data's moment, and refused 0 only when they ran)
    zero_ok: frozenset = frozenset()
    paper: str = ""

    # ------------------------------------------------------------------ what it applies to
    def why_not(self, module: nn.Module) -> str | None:
        """Why this method cannot factorize ``module``, or None if it can."""
        if isinstance(module, nn.Linear):
            return own_forward_reason(module) if self.linear is not None else (
                f"method {self.name!r} does not apply to Linear (use {_names_for('linear')})")
        if not isinstance(module, nn.Conv2d):
            return f"method {self.name!r} does not apply to {type(module).__name__}"
        if self.kxk_only and tuple(module.kernel_size) == (1, 1):
            return (f"method {self.name!r} does not apply to a 1x1 convolution (use "
                    f"{_names_for('pointwise')})")
        return conv_skip_reason(module)

    def _not_data_aware(self) -> str:
        return (f"data_aware is implemented for methods {_names_for('data_aware')} only, not "
                f"{self.name!r}")

    def layer_class(self, module: nn.Module) -> type[FactorizedLayer]:
        reason = self.why_not(module)
        if reason is not None:
            raise ValueError(reason)
        return self.linear if isinstance(module, nn.Linear) else self.conv

    # ------------------------------------------------------------------------ its settings
    def check_form(self, form: str | None) -> str | None:
        if not self.forms:
            if form is not None:
                raise ValueError(f"form: only method(s) {_names_with_forms()} take a form, "
                                 f"got {form!r} for {self.name!r}")
            return None
        form = form or self.forms[0]
        if form not in self.forms:
            raise ValueError(f"form: expected one of {', '.join(map(repr, self.forms))}, got "
                             f"{form!r}")
        return form

    def check_ranks(self, ranks) -> tuple[int, ...]:
        """``ranks`` as a tuple of ints (one rank or a sequence; whole floats and NumPy
        integers taken, bools not); anything else is an error naming the method."""
        if isinstance(ranks, numbers.Real):
            ranks = (ranks,)
        try:
            ranks = tuple(ranks)
        except TypeError:
            raise ValueError(f"ranks: method {self.name!r} expects {self.n_ranks} rank(s) >= 1, "
                             f"got {ranks!r}") from None
        if (len(ranks) != self.n_ranks
                or any(isinstance(r, bool) or not isinstance(r, numbers.Real) for r in ranks)
                or not all(math.isfinite(r) for r in ranks)
                or any(int(r) != r or r < 1 for r in ranks)):
            raise ValueError(f"ranks: method {self.name!r} expects {self.n_ranks} rank(s) >= 1, "
                             f"got {ranks}")
        return tuple(int(r) for r in ranks)

    def check_options(self, options: Mapping) -> None:
        """Refuse solver options that :attr:`solver` does not take, and values outside an
        option's :attr:`choices` (before any work)."""
        opts = {k: v for k, v in options.items() if k != DATA_AWARE}
        if not isinstance(options.get(DATA_AWARE, False), bool):  # ("no" would read as true)
            raise ValueError(f"{DATA_AWARE}: expected true or false, got "
                             f"{options[DATA_AWARE]!r}")
        if options.get(DATA_AWARE) and not self.data_aware:
            raise ValueError(self._not_data_aware())
        internal = sorted(k for k in opts if k in SET_BY_LAYERS or str(k).startswith("_"))
        if internal:
            raise ValueError(f"{internal[0]}: not an option of method {self.name!r} (rankcut "
                             "sets it itself)")
        for key, allowed in self.choices.items():
            if key in opts and opts[key] not in allowed:
                raise ValueError(f"{key}: expected one of {', '.join(map(repr, allowed))}, "
                                 f"got {opts[key]!r}")
        for key, (kind, low, strict) in NUMBER_OPTIONS.items():
            v = opts.get(key)
            if v is None:
                continue
            strict = strict and key not in self.zero_ok
            fits = (not isinstance(v, bool) and isinstance(v, int if kind is int else int | float)
                    and math.isfinite(v) and (v > low if strict else v >= low))
            if not fits:
                what = "an integer" if kind is int else "a number"
                raise ValueError(f"{key}: expected {what} {'>' if strict else '>='} {low}, "
                                 f"got {v!r}")
        try:
            inspect.signature(self.solver).bind(None, None, **solver_kwargs(opts))
        except TypeError as err:
            raise ValueError(f"options {dict(options)} do not fit rankcut.decompose."
                             f"{self.solver.__name__}: {err}") from None

    def max_rank(self, module: nn.Module, form: str | None = None) -> tuple[int, ...]:
        """The largest ranks worth asking for: a full factorization (SVD, CUR, spatial SVD,
        Tucker-2), or for CP the rank whose layer has as many parameters as the dense one."""
        if isinstance(module, nn.Linear):
            return (min(module.in_features, module.out_features),)
        geo = ConvGeometry.of(module)
        t, s = geo.out_per_group, geo.in_per_group
        kh, kw = geo.kernel_size
        if self.conv is TuckerConv2d:
            return (t, s)
        if self.conv is CPConv2d:
            return (cp_break_even(geo, self.check_form(form)),)
        if self.conv is SpatialConv2d:
            return (min(s * kh, t * kw),)
        return (min(t, s * kh * kw),)

    def capped(self, module: nn.Module, ranks, form: str | None = None) -> tuple[int, ...]:
        """``ranks``, each at most its :meth:`max_rank`, and a Tucker-2 pair at most what its
        core holds (each rank at most kh·kw times the other): as the built layer clamps them
        (``rankcut.decompose.tucker``'s bound, applied until both hold)."""
        out = [min(r, full) for r, full in zip(ranks, self.max_rank(module, form), strict=True)]
        if self.conv is TuckerConv2d and isinstance(module, nn.Conv2d):
            k = math.prod(ConvGeometry.of(module).kernel_size)
            while out[0] > out[1] * k or out[1] > out[0] * k:
                out = [min(out[0], out[1] * k), min(out[1], out[0] * k)]
        return tuple(out)

    # ---------------------------------------------------------------------- its layer
    def config(self, module: nn.Module, ranks, form: str | None = None) -> dict:
        """The factorized layer's config (``layer.config()``; see ``rankcut.layers.rebuild``)."""
        cls = self.layer_class(module)
        ranks = self.check_ranks(ranks)
        out = {"layer": cls.__name__}
        out.update({"ranks": list(ranks)} if self.n_ranks > 1 else {"rank": ranks[0]})
        if self.forms:
            out["form"] = self.check_form(form)
        out.update(self.layer_options)
        return out

    def cost(self, module: nn.Module, ranks, form: str | None, shape) -> Cost:
        """Params and MACs of the factorized layer; ``shape`` is the layer's input, (H, W) of a
        Conv2d or (rows per sample,) of a Linear."""
        return cost_at(module, shape, self.config(module, ranks, form))

    def from_dense(self, module: nn.Module, ranks, form: str | None = None, cov=None,
                   options: Mapping | None = None, entries=None) -> FactorizedLayer:
        """The factorized layer computed from ``module``'s weight (data-aware when ``cov``, the
        layer's input second moments, is given). ``entries``: for a method that keeps the
        weight's own entries (CUR), the weight whose rows and columns it keeps while fitting
        ``module``'s (sequential fitting: the dense weight, ``module`` holding the corrected
        one)."""
        if entries is None:
            return self.from_dense_many([module], ranks, form, None if cov is None else [cov],
                                        options)[0]
        if not self.keeps_entries:
            raise ValueError(f"entries: method {self.name!r} does not keep a weight's entries")
        return self.from_dense_many([module], ranks, form, None if cov is None else [cov],
                                    {**(options or {}), "entries": entries})[0]

    def from_dense_many(self, modules, ranks, form: str | None = None, covs=None,
                        options: Mapping | None = None) -> list[FactorizedLayer]:
        """:meth:`from_dense` of each of ``modules`` (``covs``: one input moment per module, or
        None), built together where the layer class batches its solver (CP)."""
        if covs is not None and not self.data_aware:
            raise ValueError(self._not_data_aware())
        out: list = [None] * len(modules)
        by_class: dict = {}
        for i, module in enumerate(modules):
            by_class.setdefault(self.layer_class(module), []).append(i)
        kwargs = dict(self.layer_options)
        if self.forms:
            kwargs["form"] = self.check_form(form)
        ranks = self.check_ranks(ranks)
        opts = {k: v for k, v in (options or {}).items() if k != DATA_AWARE}
        for cls, members in by_class.items():
            built = cls.from_dense_many([modules[i] for i in members], ranks,
                                        covs=None if covs is None else [covs[i] for i in members],
                                        **kwargs, **opts)
            for i, layer in zip(members, built, strict=True):
                out[i] = layer
        return out

    def structure(self, module: nn.Module, ranks, form: str | None = None) -> FactorizedLayer:
        """The factorized layer's shapes with fresh weights (what ``load`` fills)."""
        return rebuild(module, self.config(module, ranks, form))

    # --------------------------------------------------------------------- its curve
    def candidates(self, module, shape, form=None, options=None, kind="params") -> list:
        """Error-versus-cost candidates of ``module`` (see :mod:`rankcut.curves`)."""
        return self.curve_fn(self, module, shape, self.check_form(form), options, kind)

    def grid(self, module, shape, form=None) -> list:
        """The unmeasured candidates of a method with a ``grid_fn`` (see there)."""
        return self.grid_fn(self, module, shape, self.check_form(form))

    def candidate_at(self, module, shape, ranks, form=None, options=None):
        """The candidate at exactly ``ranks`` (clamped to what the layer holds)."""
        return self.at_fn(self, module, shape, self.check_ranks(ranks), self.check_form(form),
                          options)


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (its name and forms must be new)."""
    taken = set(REGISTRY) | {f for m in REGISTRY.values() for f in m.forms} | {"auto", "skip"}
    for name in (method.name, *method.forms):
        if name in taken:
            raise ValueError(f"method {name!r} is already registered")
    if method.spectra and len(method.spectra) != method.n_ranks:
        raise ValueError(f"method {method.name!r}: spectra gives {len(method.spectra)} "
                         f"matrices for {method.n_ranks} rank(s); one a rank, or none")
    REGISTRY[method.name] = method
    return method


def names() -> tuple[str, ...]:
    """The registered methods' names, in registration order."""
    return tuple(REGISTRY)


def aliases() -> tuple[str, ...]:
    """Every name a method can be asked for by: the methods and their forms."""
    return tuple(n for m in REGISTRY.values() for n in (m.name, *m.forms))


def resolve(name: str, form: str | None = None) -> tuple[Method, str | None]:
    """(method, form) for a method's name or one of its forms (``"cp3"`` -> cp, "cp3")."""
    if name in REGISTRY:
        method = REGISTRY[name]
        return method, method.check_form(form)
    for method in REGISTRY.values():
        if name in method.forms:
            if form not in (None, name):
                raise ValueError(f"form: {name!r} is the form {name!r} of {method.name!r}, "
                                 f"but form {form!r} was given")
            return method, name
    raise ValueError(f"method: expected one of {', '.join(aliases())}, got {name!r}")


def get(name: str) -> Method:
    return resolve(name)[0]


def check_solver_options(options) -> dict:
    """``options`` as :func:`rankcut.plan` takes them, {method: {solver option: value}}, each
    key a method and each method's options checked against its solver, before any work (the
    API and the command line's ``--solver-option`` both come here). An error names the method
    first ("cur: solver: expected one of ..."). None is no options."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ValueError(f"expected a dict of solver options per method (e.g. "
                         f"{{'cp': {{'max_iter': 100}}}}), got {type(options).__name__}")
    for name, opts in options.items():
        if name not in REGISTRY:
            raise ValueError(f"{name!r} is not a method; keys are method names: "
                             f"{', '.join(names())}")
        if not isinstance(opts, dict):
            raise ValueError(f"{name}: expected a dict, got {type(opts).__name__}")
        try:
            REGISTRY[name].check_options(opts)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    return dict(options)


def variants(name: str, module: nn.Module) -> list[tuple[Method, str | None]]:
    """The (method, form) pairs to consider for ``module`` when ``name`` was asked for:
    every form of every ``auto`` method that applies, for ``"auto"``; otherwise the named
    method, or channel SVD where it does not apply (a Linear or 1x1 conv under a conv-only
    method: :data:`FALLBACK`)."""
    if name == "auto":
        return [(m, f) for m in REGISTRY.values() if m.auto and m.why_not(module) is None
                for f in (m.forms[::-1] if m.forms else (None,))]
    method, form = resolve(name)
    if method.why_not(module) is not None and REGISTRY[FALLBACK].why_not(module) is None:
        return [(REGISTRY[FALLBACK], None)]
    return [(method, form)]


def plan_of(layer: FactorizedLayer) -> tuple[str, tuple[int, ...], str | None]:
    """(method, ranks, form) that rebuild ``layer`` (its realised ranks and form)."""
    config = layer.config()
    for method in REGISTRY.values():
        if type(layer) in (method.conv, method.linear) and all(
                config.get(k) == v for k, v in method.layer_options.items()):
            return method.name, layer.built_ranks(), config.get("form")
    raise ValueError(f"layer: no registered method builds a {type(layer).__name__} with "
                     f"config {config}")


def _names_for(what: str) -> str:
    picks = {"linear": lambda m: m.linear is not None,
             "pointwise": lambda m: not m.kxk_only and m.conv is not None,
             "data_aware": lambda m: m.data_aware}[what]
    return ", ".join(repr(m.name) for m in REGISTRY.values() if picks(m))


def _names_with_forms() -> str:
    return ", ".join(repr(m.name) for m in REGISTRY.values() if m.forms)


register(Method(
    "svd", "truncated SVD of the (T, S·kh·kw) channel matrix (Linear: of the weight)",
    conv=SVDConv2d, linear=LowRankLinear, solver=dec.svd, curve_fn=curves.svd_curve,
    at_fn=curves.from_curve_at, data_aware=True, auto=True,
    layer_options=MappingProxyType({"decomposition": "svd"}),
    choices=MappingProxyType({"solver": dec.SVD_METHODS}),
    paper="Denton et al. 2014; Zhang et al. 2016; SVD-LLM whitening (Wang et al. 2024)"))
register(Method(
    "cur", "CUR of the channel matrix: actual columns (and rows) of the weight",
    conv=SVDConv2d, linear=LowRankLinear, solver=dec.cur, curve_fn=curves.cur_curve,
    at_fn=curves.cur_at, grid_fn=curves.cur_grid,
    layer_options=MappingProxyType({"decomposition": "cur"}),
    planning_options=MappingProxyType({"solver": "deim"}), data_aware=True, keeps_entries=True,
    choices=MappingProxyType({"solver": dec.CUR_METHODS}),
    paper="Mahoney & Drineas 2009; Drineas, Kannan & Mahoney 2006; Sorensen & Embree 2016"))
register(Method(
    "spatial_svd", "SVD of the (S·kh, T·kw) reshape: a kh x 1 then a 1 x kw convolution",
    conv=SpatialConv2d, linear=None, solver=dec.svd, curve_fn=curves.spatial_curve,
    at_fn=curves.from_curve_at, kxk_only=True, auto=True, spectra=("spatial",),
    choices=MappingProxyType({"solver": dec.SVD_METHODS}),
    paper="Jaderberg, Vedaldi & Zisserman 2014"))
register(Method(
    "cp", "CP: 1x1, depthwise kh x 1 and 1 x kw (cp4) or kh x kw (cp3), 1x1",
    conv=CPConv2d, linear=None, solver=dec.cp, curve_fn=curves.cp_curve, at_fn=curves.cp_at,
    grid_fn=curves.cp_grid, scoring_options=MappingProxyType(curves.CP_SCORING),
    forms=("cp4", "cp3"), kxk_only=True, data_aware=True, auto=True, spectra=(),
    choices=MappingProxyType({"solver": dec.CP_METHODS, "init": dec.CP_INITS}),
    zero_ok=frozenset({"ridge"}), paper="Lebedev et al. 2015; Astrid & Lee 2017"))
register(Method(
    "tucker", "Tucker-2: 1x1 S->R_in, kh x kw core R_in->R_out, 1x1 R_out->T",
    conv=TuckerConv2d, linear=None, solver=dec.tucker, curve_fn=curves.tucker_curve,
    at_fn=curves.tucker_at, n_ranks=2, spectra=("channel", "input"), kxk_only=True,
    data_aware=True, auto=True,
    scoring_options=MappingProxyType(curves.TUCKER_SCORING),
    choices=MappingProxyType({"solver": dec.TUCKER_METHODS}),
    paper="Kim et al. 2016 (ranks from EVBMF, Nakajima et al. 2013)"))

# What a Linear or 1x1 conv gets when the asked-for method builds only k x k convolutions.
FALLBACK = "svd"
