"""The study on a user's own models: checkpoints + a model factory + a task, from a YAML file.

```yaml
model: mlp                   # zoo name or package.module:factory; leave out for Hugging Face folders
model_options: {width: 512}
task: digits                 # built-in name or package.module:factory
task_options: {}
checkpoints: [a.safetensors, b.safetensors, c.safetensors]   # or {name: path}
base: parent.safetensors     # optional: enables task-arithmetic merges and task vectors
```
The measurement stages run on these models; spawning (determinism) needs training and is left
out, which the report says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import MergescopeError

MAX_CHECKPOINTS = 141  # the study measures every pair: at most 9,870 pairs, as a sweep allows 10,000 tasks
MAX_POINTS = 1_001  # points on each path
MAX_CURVE_EPOCHS = 10_000


class CustomStudy(BaseModel):
    """A study over given checkpoints (validated; unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = None  # None: the checkpoints are Hugging Face folders (model from config.json)
    model_options: dict[str, Any] = {}
    task: str = "digits"
    task_options: dict[str, Any] = {}
    checkpoints: list[str] | dict[str, str]
    base: str | None = None
    path_points: int = Field(25, ge=2, le=MAX_POINTS)
    curve_epochs: int = Field(20, ge=1, le=MAX_CURVE_EPOCHS)
    seed: int = Field(0, ge=0, le=2**63 - 1)

    @property
    def named_checkpoints(self) -> dict[str, str]:
        if isinstance(self.checkpoints, dict):
            return dict(self.checkpoints)
        return {Path(p).stem: p for p in self.checkpoints}


def read_config(path: str | Path) -> CustomStudy:
    """Parse and validate a study YAML; paths are relative to the YAML's folder."""
    from ..io.untrusted import read_yaml

    path = Path(path)
    try:
        raw = read_yaml(path, "study config")  # regular UTF-8 file, aliases bounded, one-line errors
    except MergescopeError as e:
        problem = str(e).removeprefix(f"{path}: ")
        if problem.startswith("cannot read"):
            raise
        raise MergescopeError(f"{path}: cannot read study config ({problem})") from None
    if not isinstance(raw, dict):
        raise MergescopeError(f"{path}: study config must be a mapping")
    try:
        config = CustomStudy(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise MergescopeError(f"{path}: {where}: {' '.join(err['msg'].split())}") from None
    except TypeError as e:
        raise MergescopeError(f"{path}: {' '.join(str(e).split())}") from None
    if len(config.named_checkpoints) < 2:
        raise MergescopeError(f"{path}: checkpoints: need at least 2 models to study")
    if len(config.checkpoints) > MAX_CHECKPOINTS:
        raise MergescopeError(f"{path}: checkpoints: {len(config.checkpoints)} models, over the limit of "
                              f"{MAX_CHECKPOINTS} (the study measures every pair)")
    if isinstance(config.checkpoints, list) and len(config.named_checkpoints) < len(config.checkpoints):
        raise MergescopeError(f"{path}: checkpoints: two files share a name "
                              "(give a mapping {name: path} instead of a list)")
    root = path.parent

    def resolve(p: str) -> str:
        q = Path(p)
        return str(q if q.is_absolute() else root / q)

    checkpoints = {k: resolve(v) for k, v in config.named_checkpoints.items()}
    return config.model_copy(update={
        "checkpoints": checkpoints, "base": resolve(config.base) if config.base else None,
        **({} if config.model else hf_model_entry(path, next(iter(checkpoints.values())), config.model_options)),
    })


def hf_model_entry(path: Path, first: str, options: dict) -> dict:
    """``model``/``model_options`` for a config without ``model``: the first checkpoint's HF folder
    (``tasks.hf.hf_model``, which builds only transformers' own classes from its config.json)."""
    from ..tasks.hf import is_hf_folder

    if not is_hf_folder(first):
        raise MergescopeError(f"{path}: model: required unless the checkpoints are Hugging Face folders "
                              f"(with config.json); {first} is not one")
    if options:
        raise MergescopeError(f"{path}: model_options: apply to a named model; a Hugging Face folder's "
                              "architecture comes from its config.json")
    return {"model": "mergescope.tasks.hf:hf_model", "model_options": {"folder": first}}
