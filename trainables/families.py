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
"""

from __future__ import annotations

from dataclasses import dataclass

DETECTION = "detection"
INSTANCE = "instance_segmentation"
SEMANTIC = "semantic_segmentation"

# Freeze presets (the parameter ``trainable``). Which a family offers is ``Family.presets``.
PRESET_DOCS: dict[str, str] = {
    "all": "every parameter trains",
    "heads": "only the heads train (backbone and neck frozen)",
    "heads+neck": "heads and neck train, the backbone is frozen",
    "backbone_last_k": "heads, neck and the last trainable_k backbone stages train",
    "predictors": "only the class-dependent predictor layers train (linear probe)",
}
PRESETS_WITH_NECK = ("all", "heads", "heads+neck", "backbone_last_k", "predictors")
PRESETS_NO_NECK = ("all", "heads", "backbone_last_k", "predictors")

SCOPES = ("heads", "neck", "backbone", "all")
ALL_BOX = ("smooth_l1", "l1", "giou", "diou", "ciou")

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


def family_of(arch: str) -> Family | None:
    """The family of a torchvision builder name (by prefix), or None when none fits.

    A builder of a known family that is not listed in its ``archs`` (e.g. a future
    ``fcos_resnet101_fpn``) still maps to the family; the conformance test covers listed ones.
    """
    for prefix, name in _PREFIXES:
        if arch.startswith(prefix):
            return FAMILIES[name]
    return None


def all_archs() -> list[str]:
    """Every builder name listed in the table, in table order."""
    return [a for f in FAMILIES.values() for a in f.archs]
