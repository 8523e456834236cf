"""The typed spec: ``yaml.safe_load`` → pydantic models → checks across sections.

Relative paths (data, weights files, ``output_dir``) resolve against the folder of the spec
file. :func:`load_spec` does every check that needs no torch (structure, ranges, names, files,
the space, loss/architecture pairs). :func:`deep_check` (imports torch) checks the torchvision
builder and weight enum names and that every freeze pattern matches parameters. Both raise
:class:`~search.errors.SpecError`; nothing here starts Ray or touches MLflow.

- :mod:`.schema`: the pydantic sections and :class:`Spec`;
- :mod:`.load`: YAML, ``--set`` overrides, pydantic errors as one line, :func:`build_spec`;
- :mod:`.checks`: cross-section checks (no torch);
- :mod:`.deep`: torch-side checks.
"""

from search.spec.deep import check_trainable_sets, check_weights, deep_check
from search.spec.load import apply_override, build_spec, load_spec, parse_override, read_yaml
from search.spec.schema import (
    ENUM_NAME,
    MAX_GRID,
    MAX_NAME,
    NAME,
    SEED_LIMIT,
    TASK_METRICS,
    TASKS,
    DataSection,
    ModelSection,
    SearchSection,
    Spec,
    TrainSection,
)

__all__ = [
    "ENUM_NAME",
    "MAX_GRID",
    "MAX_NAME",
    "NAME",
    "SEED_LIMIT",
    "TASKS",
    "TASK_METRICS",
    "DataSection",
    "ModelSection",
    "SearchSection",
    "Spec",
    "TrainSection",
    "apply_override",
    "build_spec",
    "check_trainable_sets",
    "check_weights",
    "deep_check",
    "load_spec",
    "parse_override",
    "read_yaml",
]
