from kfp import dsl

from components import LUMOS_IMAGE


@dsl.component(base_image=LUMOS_IMAGE, install_kfp_package=False)
def pretrain(
    config_json: str,
    run_root: str,
    features: dsl.Input[dsl.Dataset],
    checkpoint: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
    loss_curve: dsl.Output[dsl.HTML],
):
    """Pretrain the I2I model on unlabeled images (a TrainJob when configured for several nodes)."""
    from lumos.pipeline.steps import train_step

    train_step(
        config_json, "i2i", run_root, features, checkpoint, metrics=metrics, loss_curve=loss_curve
    )
