from kfp import dsl

from components import LUMOS_IMAGE


@dsl.component(base_image=LUMOS_IMAGE, install_kfp_package=False)
def promote(
    config_json: str,
    head: str,
    run_root: str,
    exported: dsl.Input[dsl.Model],
    evaluation: dsl.Input[dsl.Artifact],
    manifest: dsl.Output[dsl.Artifact],
    decision: dsl.Output[dsl.Markdown],
):
    """Record a model that passed the gate and write its KServe InferenceService."""
    from lumos.pipeline.steps import promote_step

    promote_step(config_json, head, run_root, exported, evaluation, manifest, decision)
