from kfp import dsl

from components import LUMOS_IMAGE


@dsl.component(base_image=LUMOS_IMAGE, install_kfp_package=False)
def finetune(
    config_json: str,
    head: str,
    run_root: str,
    features: dsl.Input[dsl.Dataset],
    pretrained: dsl.Input[dsl.Model],
    checkpoint: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
    loss_curve: dsl.Output[dsl.HTML],
):
    """Fine-tune one head (t2i, novel_view, video) from the I2I checkpoint."""
    from lumos.pipeline.steps import train_step

    train_step(
        config_json,
        head,
        run_root,
        features,
        checkpoint,
        init_from=pretrained,
        metrics=metrics,
        loss_curve=loss_curve,
    )
