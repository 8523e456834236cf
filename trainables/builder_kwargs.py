"""Which ``model_kwargs`` a builder chain really uses: :func:`accepted_kwargs`, :func:`ignored_kwargs`.

Found with :func:`inspect.signature` over torchvision's builder → class → transform chain; the
tables below name what signatures cannot show. Used by spec validation (a kwarg no link
receives is reported) and by :mod:`trainables.models` (:data:`RESERVED_KWARGS`).
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from typing import Any

from torch import nn
from torchvision.models import get_model_builder
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from trainables import compose
from trainables.families import SEMANTIC, family_of

# Keys that come from the spec's weights and the data, never from model_kwargs.
RESERVED_KWARGS = ("weights", "weights_backbone", "num_classes", "progress")


# Keys that the ssdlite builder also forwards to ``mobilenet_v3_large(**kwargs)`` (torchvision 0.29:
# ``_mobilenet_v3_conf`` then ``MobileNetV3``). ``dropout`` reaches MobileNetV3 too, but only sets the
# dropout of its classifier, which the SSD feature extractor drops: ignored silently, so not listed.
_BACKBONE_KWARGS: dict[str, tuple[str, ...]] = {
    "ssdlite320_mobilenet_v3_large": ("width_mult", "dilated", "block"),
}
# Parameters of the chain that a link passes itself (by builder name or class name), so giving them
# again is a TypeError the build reports: SSD fixes its transform's size_divisible and fixed_size,
# the ssdlite builder the backbone's reduced_tail. (Module-valued arguments that v2 builders pass,
# such as rpn_head, are not listed: YAML cannot give a module.)
_SET_BY_CHAIN: dict[str, tuple[str, ...]] = {
    "SSD": ("size_divisible", "fixed_size"),
    "ssdlite320_mobilenet_v3_large": ("reduced_tail",),
}
# Keys a builder pops from its ``**kwargs`` itself (torchvision 0.29: lraspp refuses aux_loss=True).
_POPPED_KWARGS: dict[str, tuple[str, ...]] = {"lraspp_mobilenet_v3_large": ("aux_loss",)}
# The head class of each composed detection family (trainables.compose_build.assemble).
# Types the chain accepts beyond its first link's annotation or default: GeneralizedRCNNTransform
# takes a list of min_size values (one drawn per training image), as torchvision's references use.
_LOOSER_TYPES: dict[str, Any] = {"min_size": int | list[int]}
_COMPOSED_HEADS: dict[str, type[nn.Module]] = {
    "fasterrcnn": FasterRCNN,
    "maskrcnn": MaskRCNN,
    "retinanet": RetinaNet,
    "fcos": FCOS,
}


def _named(fn: Any, with_default_only: bool = False) -> set[str]:
    """The named parameters of ``fn`` (a function or a class: its ``__init__``), without ``self``,
    ``*args``/``**kwargs`` and, with ``with_default_only``, the required ones."""
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {
        name
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind in plain and name != "self" and not (with_default_only and p.default is p.empty)
    }


def _takes_var_kwargs(fn: Any) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


def _class_chain(cls: type) -> tuple[set[str], set[str]]:
    """``(used, reached)`` for a detection class: its ``__init__`` parameters and those of its
    bases as long as each ``__init__`` takes ``**kwargs`` (MaskRCNN passes them to FasterRCNN; a base
    without, such as GeneralizedRCNN, gets explicit arguments), then ``GeneralizedRCNNTransform``'s,
    where the last ``**kwargs`` end. *reached*: every such named parameter. *used*: those with a
    default, minus ``_SET_BY_CHAIN``: the required ones (backbone, anchor_generator, size; the
    transform's min_size, ...) are passed by the builder or the class, so only the names the class
    itself takes reach them (SSD takes image_mean, not min_size)."""
    used: set[str] = set()
    reached: set[str] = set()
    for base in cls.__mro__:
        if base is nn.Module or not issubclass(base, nn.Module):
            break
        if "__init__" not in base.__dict__:
            continue
        if not _takes_var_kwargs(base.__init__):
            if base is cls:  # nothing reaches a transform
                return _named(cls.__init__, with_default_only=True), _named(cls.__init__)
            break
        used |= _named(base.__init__, with_default_only=True)
        reached |= _named(base.__init__)
    used |= _named(GeneralizedRCNNTransform.__init__, with_default_only=True)
    reached |= _named(GeneralizedRCNNTransform.__init__)
    return used - set(_SET_BY_CHAIN.get(cls.__name__, ())), reached


@functools.cache
def _kwargs_chain(arch: str) -> tuple[frozenset[str], frozenset[str]] | None:
    """``(used, reached)`` names of ``arch``'s builder chain (see :func:`accepted_kwargs`); reached
    includes the names that the chain passes itself (a duplicate is a TypeError, not silence)."""
    fam = family_of(arch)
    if fam is None:
        return None
    if fam.composed:
        if fam.task == SEMANTIC:
            return frozenset({"aux_loss"}), frozenset({"aux_loss"})
        head = _COMPOSED_HEADS.get(fam.name)
        if head is None:
            return None
        used, reached = _class_chain(head)
        used -= set(compose.RESERVED)
    else:
        try:
            builder = get_model_builder(arch)
        except ValueError:
            return None
        used = _named(builder) | set(_POPPED_KWARGS.get(arch, ()))
        reached = set(used)
        if fam.task != SEMANTIC:
            cls = inspect.signature(builder).return_annotation
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
                return None
            cls_used, cls_reached = _class_chain(cls)
            set_here = set(_SET_BY_CHAIN.get(arch, ()))
            used |= (cls_used | set(_BACKBONE_KWARGS.get(arch, ()))) - set_here
            reached |= cls_reached | used | set_here
    reserved = {*RESERVED_KWARGS, compose.COMPOSE_KEY}
    if not used - reserved:
        return None
    return frozenset(used - reserved), frozenset(reached - reserved)


def accepted_kwargs(arch: str) -> frozenset[str] | None:
    """The ``model_kwargs`` names that ``arch``'s builder chain really uses (found with
    :func:`inspect.signature` over the chain). None: the chain is unknown (not a builder of a
    family), so no check.

    Assumes torchvision 0.29's chains (read from its source):
    - detection/instance builders pass their ``**kwargs`` to the class of their return annotation
      (FasterRCNN, MaskRCNN, RetinaNet, FCOS, SSD), which passes its own to
      ``GeneralizedRCNNTransform``, where they end (unknown keys are dropped there without a word);
      ssdlite also forwards them to its MobileNetV3 backbone (``_BACKBONE_KWARGS``). Parameters that
      a link passes itself are not usable (``_SET_BY_CHAIN``; e.g. SSD fixes min_size/max_size);
    - semantic builders (deeplabv3_*, fcn_*, lraspp_*) forward nothing: their ``**kwargs`` are unused,
      so only their own named parameters count (``aux_loss``; lraspp pops ``aux_loss`` from its
      ``**kwargs`` and refuses ``True``);
    - composed archs (:mod:`trainables.compose`): the ``compose`` settings are checked there; the
      other kwargs go to the head class chain (FasterRCNN, ... as above), minus the arguments the
      composition sets itself (``compose.RESERVED``); segmentation compositions take only aux_loss.
    Reserved keys (weights, num_classes, progress, ``compose``) are never in the set. Module-valued
    parameters (rpn_head, head, ...) are listed, though YAML cannot give one, and some v2 builders
    pass them themselves (a TypeError the build reports).
    """
    chain = _kwargs_chain(arch)
    return None if chain is None else chain[0]


def ignored_kwargs(arch: str, model_kwargs: dict[str, Any] | None) -> list[str]:
    """The keys of ``model_kwargs`` that no named parameter of ``arch``'s builder chain receives, so
    a ``**kwargs`` swallows them and they are ignored silently (in the given order); [] when the
    chain is unknown. Not listed: keys that the build refuses itself, loudly (reserved keys,
    ``compose``, a composition's own arguments, and parameters the chain passes itself, such as
    SSD's min_size: a TypeError)."""
    chain = _kwargs_chain(arch)
    if chain is None:
        return []
    fam = family_of(arch)
    refused = {*RESERVED_KWARGS, compose.COMPOSE_KEY, *(compose.RESERVED if fam.composed else ())}
    return [k for k in (model_kwargs or {}) if k not in chain[1] and k not in refused]


def _chain_signatures(arch: str) -> list[inspect.Signature]:
    """The signatures along ``arch``'s builder chain, first link first (the builder, its class and
    bases, the transform; ssdlite's backbone config), for the types of the kwargs they receive."""
    from torchvision.models import mobilenetv3

    fam = family_of(arch)
    links: list[Any] = []
    if fam.composed:
        cls = _COMPOSED_HEADS.get(fam.name)
    else:
        links.append(get_model_builder(arch))
        cls = inspect.signature(links[0]).return_annotation
    if isinstance(cls, type) and issubclass(cls, nn.Module):
        links += [b.__init__ for b in cls.__mro__ if issubclass(b, nn.Module) and "__init__" in b.__dict__]
        links.append(GeneralizedRCNNTransform.__init__)
    if arch in _BACKBONE_KWARGS:
        links.append(mobilenetv3._mobilenet_v3_conf)
    return [inspect.signature(fn) for fn in links]


_NOUNS = {bool: "boolean", int: "integer", float: "number", str: "string"}


def _type_words(kind: Any) -> str | None:
    """``kind`` (an annotation, or the type of a default) in words; None when not checked here
    (modules, callables, enums, Any)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        words = [_type_words(a) for a in args if a is not type(None)]
        return None if None in words else " or ".join(words) + (" or null" if type(None) in args else "")
    if origin in (list, tuple) or kind in (list, tuple):
        items = {a for a in args if a is not Ellipsis}
        if len(items) > 1 or (items and next(iter(items)) not in _NOUNS):
            return None
        count = f"{len(args)} " if origin is tuple and Ellipsis not in args and args else ""
        return f"a list of {count}{_NOUNS[next(iter(items))] + 's' if items else 'values'}"
    if kind not in _NOUNS:
        return None
    return f"{'an' if _NOUNS[kind][0] in 'aeiou' else 'a'} {_NOUNS[kind]}"


def _fits(value: Any, kind: Any) -> bool:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if kind is type(None):
        return value is None
    if origin in (list, tuple) or kind in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis and len(value) != len(args):
            return False
        return not args or all(_fits(v, args[0]) for v in value)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind) if kind in (bool, str) else True


def mistyped_kwarg(arch: str, model_kwargs: dict[str, Any] | None) -> tuple[str, str, Any] | None:
    """The first of ``model_kwargs`` whose value is not of the type that the first link of the
    chain taking it declares (its annotation, else its default's type): ``(key, type in words,
    default)``; None when all fit or the chain is unknown. (``topk_candidates: abc`` was built
    without a word and failed in the first forward pass.)"""
    if _kwargs_chain(arch) is None:
        return None
    sigs = _chain_signatures(arch)
    for key, value in (model_kwargs or {}).items():
        links = [s.parameters[key] for s in sigs if key in s.parameters]
        # RetinaNet's image_mean=None says nothing; the transform's annotation does
        p = next((p for p in links if p.annotation is not p.empty or p.default not in (None, p.empty)), None)
        if p is None:
            continue
        kind = _LOOSER_TYPES.get(key, p.annotation if p.annotation is not p.empty else type(p.default))
        if isinstance(kind, str):  # an annotation left as text (a postponed one): not checked here
            continue
        if links[0].default is None:  # FasterRCNN's image_mean=None: the transform's then
            kind = kind | None
        words = _type_words(kind)
        if words is not None and not _fits(value, kind):
            return key, words, links[0].default if links[0].default is not p.empty else None
    return None
