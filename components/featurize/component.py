from kfp import dsl

from components import LUMOS_IMAGE


@dsl.component(base_image=LUMOS_IMAGE, install_kfp_package=False)
def featurize(config_json: str, dataset: dsl.Input[dsl.Dataset], features: dsl.Output[dsl.Dataset]):
    """Cache the frozen encoders' outputs (VAE latents, DINO CLS, T5 tokens) with the dataset."""
    from lumos.pipeline.steps import featurize_step

    featurize_step(config_json, dataset, features)
