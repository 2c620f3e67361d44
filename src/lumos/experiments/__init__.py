"""Experiments that test the paper's claims with the pipeline's own stages.

`lumos experiment claim --preset experiment-cpu` (`lumos.experiments.claim.run_claim`): arms A-D
(T2I from scratch on 100% / 10% of the pairs, from the I2I prior on 10%, from scratch on 10% with
the prior's total compute) and novel-view / video heads from the I2I prior against a T2I prior,
each over several seeds, into one Markdown report (`lumos.experiments.report`).
"""
