"""Every stage's config model, in modules that import pydantic and the standard library only.

    from lumos.configs.training import TrainConfig
    from lumos.configs.k8s import DistributedConfig

`lumos.config` composes these into `PipelineConfig` (with presets and `--set` overrides); each
stage module imports its own config from here. They live apart from the code that runs a stage so
that reading a config (`lumos config show`, `lumos compile`, a component starting) never imports
torch, and so that `lumos.config` depends on no stage package: `lumos.k8s` reads the pipeline
config, and the config no longer reads `lumos.k8s`. `tests/test_import_graph.py` keeps it so.
This file imports nothing: importing one config module costs only that module.
"""
