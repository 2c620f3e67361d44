from kfp import dsl

from components import LUMOS_IMAGE


@dsl.component(base_image=LUMOS_IMAGE, install_kfp_package=False)
def evaluate(
    config_json: str,
    head: str,
    run_root: str,
    checkpoint: dsl.Input[dsl.Model],
    features: dsl.Input[dsl.Dataset],
    metrics: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.HTML],
    evaluation: dsl.Output[dsl.Artifact],
) -> bool:
    """Metrics on the eval split, an HTML report of samples, and the gate's verdict."""
    from lumos.pipeline.steps import evaluate_step

    return evaluate_step(
        config_json, head, run_root, checkpoint, features, metrics, report, evaluation
    )
