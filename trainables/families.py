"""Architecture families: what each torchvision builder family supports, as one explicit table.

Pure Python (no torch import): spec validation reads it before anything heavy is imported.
A conformance test (tests/test_plugins.py) checks every row against real models: the prefixes
cover every parameter exactly once, ``loss_terms`` equal the keys of the training loss dict, and
every listed loss changes the computed loss.

Names used below:
- *prefixes* are parameter-name prefixes (a module path with a trailing dot, or a full
  parameter name); a parameter belongs to the part (heads, neck, backbone) with the longest
  prefix it starts with (``Family.part``). ``backbone_prefixes`` never catch another part's
  parameters, so a plain ``startswith`` (the optimizer's backbone lr multiplier) agrees.
- *predictors* are fnmatch globs over parameter names: the class-dependent layers that
  :func:`trainables.models.build_model` replaces for a new class count.
- *stage_roots* are module paths whose children, in order, are the backbone's units;
  :func:`trainables.freeze.backbone_stages` cuts them into stages (a new stage starts at a child
  named ``layerN``, at a MobileNet block marked ``_is_cn`` (strided), or after a ``MaxPool2d``).

Compositions (:data:`COMPOSED`): the exact arch names ``fasterrcnn``, ``maskrcnn``, ``retinanet``,
``fcos``, ``deeplabv3`` and ``fcn`` put any torchvision classification backbone (``model.backbone``)
under torchvision's own head class (:mod:`trainables.compose`). Their rows copy the builder family
of the same name (same ``name``, so losses and predictor replacement apply unchanged) with
``composed=True``; the composed layout is the builders' one (``backbone.body.<unit>`` and
``backbone.fpn.`` for detection, ``backbone.<unit>`` for segmentation), and the composed body
marks each unit that raises the output stride ``_is_cn``, so backbone stages cut at strides.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from trainables.loss_table import BOX_TABLE

DETECTION = "detection"
INSTANCE = "instance_segmentation"
SEMANTIC = "semantic_segmentation"

# The freeze presets a family offers (``Family.presets``); the presets are ``freeze.PRESETS``.
PRESETS_WITH_NECK = ("all", "heads", "heads+neck", "backbone_last_k", "predictors")
PRESETS_NO_NECK = ("all", "heads", "backbone_last_k", "predictors")

SCOPES = ("heads", "neck", "backbone", "all")
ALL_BOX = tuple(BOX_TABLE)

_RCNN_TERMS = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")
_FPN_BACKBONE = ("backbone.body.",)
_FPN_NECK = ("backbone.fpn.",)


@dataclass(frozen=True)
class Family:
    """One family of torchvision builders that share heads, losses and parameter layout.

    ``box_losses``/``cls_losses``: the values of ``loss.box``/``loss.cls`` accepted besides
    ``default`` (validation rejects the rest). ``box_term``/``cls_term``: the loss-dict key those
    choices change (R-CNN: the second stage only; the RPN keeps its own losses).
    ``default_box``/``default_cls``: the table row that ``default`` equals exactly, if any
    (``default_box_by_arch`` overrides per builder). ``loss_terms``: keys of the training loss dict
    (semantic: of :func:`trainables.losses.semantic_losses`; ``loss_aux`` only when the model has
    an auxiliary classifier). ``num_classes_key``: a state-dict key whose first dimension is the
    class count times a per-model factor (used to read the class count of a weights file).
    """

    name: str
    task: str
    archs: tuple[str, ...]
    box_losses: tuple[str, ...]
    cls_losses: tuple[str, ...]
    loss_terms: tuple[str, ...]
    presets: tuple[str, ...]
    backbone_prefixes: tuple[str, ...]
    neck_prefixes: tuple[str, ...]
    head_prefixes: tuple[str, ...]
    predictors: tuple[str, ...]
    stage_roots: tuple[str, ...]
    num_classes_key: str
    box_term: str | None = None
    cls_term: str | None = None
    default_box: str | None = None
    default_cls: str | None = None
    default_box_by_arch: tuple[tuple[str, str], ...] = ()
    notes: str = ""
    composed: bool = False  # an arch composed from model.backbone (trainables.compose), not a builder

    def part(self, name: str) -> str:
        """``heads``, ``neck``, ``backbone`` or ``other`` for a parameter, buffer or module name.

        The longest matching prefix wins (``classifier.0.`` is deeplabv3's neck inside
        ``classifier.``; ``backbone.extra.0.`` is SSD's backbone inside ``backbone.extra.``).
        """
        best, best_len = "other", -1
        for part, prefixes in (
            ("heads", self.head_prefixes),
            ("neck", self.neck_prefixes),
            ("backbone", self.backbone_prefixes),
        ):
            for prefix in prefixes:
                if name.startswith(prefix) and len(prefix) > best_len:
                    best, best_len = part, len(prefix)
        return best

    def in_scope(self, name: str, scope: str) -> bool:
        """Whether a parameter/module name lies in ``scope`` (``heads``, ``neck``, ``backbone``, ``all``)."""
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; known: {list(SCOPES)}")
        return scope == "all" or self.part(name) == scope

    def native_box(self, arch: str) -> str | None:
        """The box-loss row that ``default`` equals for ``arch`` (None: no row equals it)."""
        return dict(self.default_box_by_arch).get(arch, self.default_box)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="fasterrcnn",
            task=DETECTION,
            archs=(
                "fasterrcnn_resnet50_fpn",
                "fasterrcnn_resnet50_fpn_v2",
                "fasterrcnn_mobilenet_v3_large_fpn",
                "fasterrcnn_mobilenet_v3_large_320_fpn",
            ),
            box_losses=ALL_BOX,
            cls_losses=("ce", "focal"),
            loss_terms=_RCNN_TERMS,
            presets=PRESETS_WITH_NECK,
            backbone_prefixes=_FPN_BACKBONE,
            neck_prefixes=_FPN_NECK,
            head_prefixes=("rpn.", "roi_heads."),
            predictors=("roi_heads.box_predictor.*",),
            stage_roots=("backbone.body",),
            num_classes_key="roi_heads.box_predictor.cls_score.weight",
            box_term="loss_box_reg",
            cls_term="loss_classifier",
            default_box=None,  # smooth L1 with beta 1/9 (the table's smooth_l1 uses beta 1)
            default_cls="ce",
            notes="v1 heads use F.relu (TwoMLPHead) and the v1 FPN has no activation modules",
        ),
        Family(
            name="maskrcnn",
            task=INSTANCE,
            archs=("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"),
            box_losses=ALL_BOX,
            cls_losses=("ce", "focal"),
            loss_terms=(*_RCNN_TERMS, "loss_mask"),
            presets=PRESETS_WITH_NECK,
            backbone_prefixes=_FPN_BACKBONE,
            neck_prefixes=_FPN_NECK,
            head_prefixes=("rpn.", "roi_heads."),
            predictors=("roi_heads.box_predictor.*", "roi_heads.mask_predictor.mask_fcn_logits.*"),
            stage_roots=("backbone.body",),
            num_classes_key="roi_heads.box_predictor.cls_score.weight",
            box_term="loss_box_reg",
            cls_term="loss_classifier",
            default_box=None,
            default_cls="ce",
        ),
        Family(
            name="retinanet",
            task=DETECTION,
            archs=("retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2"),
            box_losses=ALL_BOX,
            cls_losses=("ce", "focal"),
            loss_terms=("classification", "bbox_regression"),
            presets=PRESETS_WITH_NECK,
            backbone_prefixes=_FPN_BACKBONE,
            neck_prefixes=_FPN_NECK,
            head_prefixes=("head.",),
            predictors=("head.classification_head.cls_logits.*",),
            stage_roots=("backbone.body",),
            num_classes_key="head.classification_head.cls_logits.weight",
            box_term="bbox_regression",
            cls_term="classification",
            default_box="l1",
            default_box_by_arch=(("retinanet_resnet50_fpn_v2", "giou"),),
            default_cls="focal",  # with loss.focal_gamma 2 and loss.focal_alpha 0.25
            notes="ce is per-class sigmoid binary cross-entropy (the head is sigmoid-based)",
        ),
        Family(
            name="fcos",
            task=DETECTION,
            archs=("fcos_resnet50_fpn",),
            box_losses=ALL_BOX,
            cls_losses=("ce", "focal"),
            loss_terms=("classification", "bbox_regression", "bbox_ctrness"),
            presets=PRESETS_WITH_NECK,
            backbone_prefixes=_FPN_BACKBONE,
            neck_prefixes=_FPN_NECK,
            head_prefixes=("head.",),
            predictors=("head.classification_head.cls_logits.*",),
            stage_roots=("backbone.body",),
            num_classes_key="head.classification_head.cls_logits.weight",
            box_term="bbox_regression",
            cls_term="classification",
            default_box="giou",
            default_cls="focal",
            notes="l1/smooth_l1 act on the size-normalised ltrb distances; ce is sigmoid BCE",
        ),
        Family(
            name="ssd",
            task=DETECTION,
            archs=("ssd300_vgg16",),
            box_losses=ALL_BOX,
            cls_losses=("ce", "focal"),
            loss_terms=("bbox_regression", "classification"),
            presets=PRESETS_WITH_NECK,
            # extra.0 is VGG conv5 + fc6/fc7: backbone; extra.1-4 and the L2-norm scale: neck.
            backbone_prefixes=("backbone.features.", "backbone.extra.0."),
            neck_prefixes=("backbone.scale_weight", "backbone.extra."),
            head_prefixes=("head.",),
            predictors=("head.classification_head.*",),
            stage_roots=("backbone.features", "backbone.extra.0"),
            num_classes_key="head.classification_head.module_list.0.weight",
            box_term="bbox_regression",
            cls_term="classification",
            default_box="smooth_l1",
            default_cls="ce",
            notes="focal replaces the per-anchor CE before hard negative mining (3:1)",
        ),
        Family(
            name="ssdlite",
            task=DETECTION,
            archs=("ssdlite320_mobilenet_v3_large",),
            box_losses=ALL_BOX,
            cls_losses=("ce", "focal"),
            loss_terms=("bbox_regression", "classification"),
            presets=PRESETS_WITH_NECK,
            backbone_prefixes=("backbone.features.",),
            neck_prefixes=("backbone.extra.",),
            head_prefixes=("head.",),
            predictors=("head.classification_head.module_list.?.1.*",),  # ? = one digit (6 levels)
            stage_roots=("backbone.features.0", "backbone.features.1"),
            num_classes_key="head.classification_head.module_list.0.1.weight",
            box_term="bbox_regression",
            cls_term="classification",
            default_box="smooth_l1",
            default_cls="ce",
        ),
        Family(
            name="deeplabv3",
            task=SEMANTIC,
            archs=("deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large"),
            box_losses=(),
            cls_losses=(),
            loss_terms=("loss_seg", "loss_aux"),
            presets=PRESETS_WITH_NECK,
            backbone_prefixes=("backbone.",),
            neck_prefixes=("classifier.0.",),  # ASPP
            head_prefixes=("classifier.", "aux_classifier."),
            predictors=("classifier.4.*", "aux_classifier.4.*"),
            stage_roots=("backbone",),
            num_classes_key="classifier.4.weight",
        ),
        Family(
            name="fcn",
            task=SEMANTIC,
            archs=("fcn_resnet50", "fcn_resnet101"),
            box_losses=(),
            cls_losses=(),
            loss_terms=("loss_seg", "loss_aux"),
            presets=PRESETS_NO_NECK,
            backbone_prefixes=("backbone.",),
            neck_prefixes=(),
            head_prefixes=("classifier.", "aux_classifier."),
            predictors=("classifier.4.*", "aux_classifier.4.*"),
            stage_roots=("backbone",),
            num_classes_key="classifier.4.weight",
        ),
        Family(
            name="lraspp",
            task=SEMANTIC,
            archs=("lraspp_mobilenet_v3_large",),
            box_losses=(),
            cls_losses=(),
            loss_terms=("loss_seg",),
            presets=PRESETS_NO_NECK,
            backbone_prefixes=("backbone.",),
            neck_prefixes=(),
            head_prefixes=("classifier.",),
            predictors=("classifier.low_classifier.*", "classifier.high_classifier.*"),
            stage_roots=("backbone",),
            num_classes_key="classifier.low_classifier.weight",
        ),
    )
}

# Builder-name prefix → family, longest first (``fasterrcnn_`` must not catch ``fcn_``).
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("fasterrcnn_", "fasterrcnn"),
    ("maskrcnn_", "maskrcnn"),
    ("retinanet_", "retinanet"),
    ("fcos_", "fcos"),
    ("ssdlite", "ssdlite"),
    ("ssd", "ssd"),
    ("deeplabv3_", "deeplabv3"),
    ("fcn_", "fcn"),
    ("lraspp_", "lraspp"),
)


def _composition(base: Family, notes: str) -> Family:
    return replace(base, archs=(base.name,), default_box_by_arch=(), notes=notes, composed=True)


# Composed archs (exact names) -> their rows. Without an FPN a detection composition has no neck
# (``heads+neck`` then trains the same parameters as ``heads``).
COMPOSED: dict[str, Family] = {
    f.name: f
    for f in (
        _composition(FAMILIES["fasterrcnn"], "FasterRCNN over model.backbone (TwoMLPHead box head)"),
        _composition(FAMILIES["maskrcnn"], "MaskRCNN over model.backbone"),
        _composition(FAMILIES["retinanet"], "RetinaNet (v1 head, l1 box loss) over model.backbone"),
        _composition(FAMILIES["fcos"], "FCOS over model.backbone"),
        _composition(FAMILIES["deeplabv3"], "DeepLabHead (+ FCNHead aux) over model.backbone"),
        _composition(FAMILIES["fcn"], "FCNHead (+ FCNHead aux) over model.backbone"),
    )
}


def family_of(arch: str) -> Family | None:
    """The family of a composed arch (exact name) or of a torchvision builder name (by prefix),
    or None when none fits.

    A builder of a known family that is not listed in its ``archs`` (e.g. a future
    ``fcos_resnet101_fpn``) still maps to the family; the conformance test covers listed ones.
    """
    if arch in COMPOSED:
        return COMPOSED[arch]
    for prefix, name in _PREFIXES:
        if arch.startswith(prefix):
            return FAMILIES[name]
    return None


def all_archs() -> list[str]:
    """Every builder name listed in the table, in table order (compositions not included)."""
    return [a for f in FAMILIES.values() for a in f.archs]


def composed_archs() -> list[str]:
    """The composed arch names (``model.arch`` values that need ``model.backbone``)."""
    return list(COMPOSED)


def feature_map_count(family: Family, fpn: bool, n_layers: int) -> int:
    """Feature maps a composed detector's heads see: one per feature layer, plus the FPN's extra
    levels (R-CNN: one max-pooled level; RetinaNet/FCOS: P6 and P7); no FPN: the one layer."""
    if not fpn:
        return n_layers
    return n_layers + (1 if family.name in ("fasterrcnn", "maskrcnn") else 2)


def default_feature_layer_count(family: Family, fpn: bool) -> int:
    """How many backbone units feed a composed detector by default: R-CNN with FPN 4 (strides
    4-32), RetinaNet/FCOS with FPN 3 (strides 8-32, plus P6/P7), without FPN 1 (the last unit)."""
    if not fpn:
        return 1
    return 4 if family.name in ("fasterrcnn", "maskrcnn") else 3


def anchor_problem(
    family: Family,
    fpn: bool,
    n_layers: int,
    sizes: list[list[float]] | None,
    ratios: list[list[float]] | list[float] | None,
) -> tuple[str, str] | None:
    """What is wrong with a composed detector's feature layers and anchors, as ``(key, problem)``,
    or None. ``sizes``: one list of anchor sizes per feature map; ``ratios``: one list per map or
    one flat list for every map (None: the defaults, which always fit)."""
    if not fpn and n_layers != 1:
        return (
            "model.feature_layers",
            f"without an FPN a {family.name} composition takes exactly one feature layer (its heads "
            f"share one convolution over all maps), but {n_layers} are listed",
        )
    n_maps = feature_map_count(family, fpn, n_layers)
    extra = f" ({n_layers} feature layers + {n_maps - n_layers} FPN extra levels)" if fpn else ""
    maps = f"{n_maps} feature map{'s' if n_maps != 1 else ''}"
    if sizes is not None:
        if len(sizes) != n_maps:
            return (
                "model.anchor_sizes",
                f"lists {len(sizes)} size groups, but the model has {maps}{extra}; give one list of "
                "sizes per feature map",
            )
        if any(not group or any(s <= 0 for s in group) for group in sizes):
            return "model.anchor_sizes", "every group needs at least one size, and sizes must be > 0"
    nested = ratios is not None and bool(ratios) and all(isinstance(r, (list, tuple)) for r in ratios)
    if ratios is not None:
        groups = list(ratios) if nested else [list(ratios)] * n_maps
        if nested and len(groups) != n_maps:
            return (
                "model.aspect_ratios",
                f"lists {len(groups)} ratio groups, but the model has {maps}{extra}; give one list "
                "per feature map or one flat list for all",
            )
        if any(not g or any(r <= 0 for r in g) for g in groups):
            return "model.aspect_ratios", "every group needs at least one ratio, and ratios must be > 0"
    else:
        groups = None
    if sizes is not None or groups is not None:
        per_map = [
            (len(sizes[i]) if sizes is not None else None, len(groups[i]) if groups is not None else None)
            for i in range(n_maps)
        ]
        if family.name == "fcos":
            if any(s not in (None, 1) or r not in (None, 1) for s, r in per_map):
                bad_sizes = any(s not in (None, 1) for s, _ in per_map)
                return (
                    "model.anchor_sizes" if bad_sizes else "model.aspect_ratios",
                    "FCOS is anchor-free: each feature map takes exactly one size and one aspect ratio",
                )
        elif sizes is not None and groups is not None:
            counts = {s * r for s, r in per_map}
            if len(counts) > 1:
                return (
                    "model.anchor_sizes",
                    f"the anchors per location (sizes x ratios) differ between feature maps "
                    f"({sorted(counts)}), but {family.name}'s head shares one convolution over all maps; "
                    "make them equal",
                )
        elif sizes is not None and len({len(g) for g in sizes}) > 1:
            return (
                "model.anchor_sizes",
                f"the groups have different numbers of sizes, but {family.name}'s head shares one "
                "convolution over all maps; use equal numbers (or set aspect_ratios to balance them)",
            )
        elif groups is not None and len({len(g) for g in groups}) > 1:
            return (
                "model.aspect_ratios",
                f"the groups have different numbers of ratios, but {family.name}'s head shares one "
                "convolution over all maps; use equal numbers (or set anchor_sizes to balance them)",
            )
    return None
