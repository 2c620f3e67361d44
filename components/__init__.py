"""KFP components: one folder per step, each a thin `@dsl.component` over `lumos.pipeline.steps`.

Only the standard library and kfp are imported at a component file's top level; the library is
imported inside each body (that is what runs in the step's container).
"""

# The image every step runs in (docker/train.Dockerfile); the pipeline overrides it from config.
# lumos.configs.k8s imports only pydantic and the standard library.
from lumos.configs.k8s import TRAIN_IMAGE as LUMOS_IMAGE

__all__ = ["LUMOS_IMAGE"]
