"""Featurize, the training loop, checkpoints and training metrics.

Import the stage modules directly (`lumos.training.train`, `lumos.training.featurize`): this
package file stays empty of imports so `import lumos.training.checkpoint` does not pull the
encoders in.
"""
