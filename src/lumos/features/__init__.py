"""Features: the cached encoder outputs of a dataset, the format with its writer and readers in one place.

    from lumos.features.table import load_feature_table
    from lumos.features.items import FeatureDataset
    table = load_feature_table("s3://lumos/datasets/images", split="eval")
    batch = FeatureDataset.for_head(table, "i2i").batch([0, 1, 2, 3])

- `format`: the files of a featurized dataset (layout, the writer, one part's readers, legacy
  layouts)
- `cache`: local copies of the parts of a dataset in the object store
- `table`: every part of a split as one memory-mapped table of samples
- `items`: a head's items and their batches (training and evaluation)
"""
