"""Featurize, the training loop and training metrics.

Import the stage modules directly (`lumos.training.train`, `lumos.training.featurize`): this
package file stays empty of imports so that importing one stage does not pull the others in.
Checkpoints (`lumos.checkpoints`) and feature files (`lumos.features`) have packages of their own.
"""
