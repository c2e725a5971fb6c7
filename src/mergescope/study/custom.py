"""The study on a user's own models: checkpoints + a model factory + a task, from a YAML file.

```yaml
model: mlp                   # zoo name or package.module:factory
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

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import MergescopeError


class CustomStudy(BaseModel):
    """A study over given checkpoints (validated; unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    model_options: dict[str, Any] = {}
    task: str = "digits"
    task_options: dict[str, Any] = {}
    checkpoints: list[str] | dict[str, str]
    base: str | None = None
    path_points: int = 25
    curve_epochs: int = 20
    seed: int = 0

    @property
    def named_checkpoints(self) -> dict[str, str]:
        if isinstance(self.checkpoints, dict):
            return dict(self.checkpoints)
        return {Path(p).stem: p for p in self.checkpoints}


def read_config(path: str | Path) -> CustomStudy:
    """Parse and validate a study YAML; paths are relative to the YAML's folder."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise MergescopeError(f"{path}: cannot read study config ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise MergescopeError(f"{path}: study config must be a mapping")
    try:
        config = CustomStudy(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise MergescopeError(f"{path}: {where}: {err['msg']}") from None
    except TypeError as e:
        raise MergescopeError(f"{path}: {e}") from None
    if len(config.named_checkpoints) < 2:
        raise MergescopeError(f"{path}: checkpoints: need at least 2 models to study")
    root = path.parent

    def resolve(p: str) -> str:
        q = Path(p)
        return str(q if q.is_absolute() else root / q)

    return config.model_copy(update={
        "checkpoints": {k: resolve(v) for k, v in config.named_checkpoints.items()},
        "base": resolve(config.base) if config.base else None,
    })
