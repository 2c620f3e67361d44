from kfp import dsl

from components import LUMOS_IMAGE


@dsl.component(base_image=LUMOS_IMAGE, install_kfp_package=False)
def export(
    config_json: str,
    head: str,
    run_root: str,
    checkpoint: dsl.Input[dsl.Model],
    exported: dsl.Output[dsl.Model],
    parity: dsl.Output[dsl.Metrics],
):
    """Export the EMA denoiser to ONNX (and TensorRT where present), checked on onnxruntime."""
    from lumos.pipeline.steps import export_step

    export_step(config_json, head, run_root, checkpoint, exported, parity)
